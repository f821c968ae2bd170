"""The command line and the orchestration on top of the layers: options, model sources, the
stage cache, and the deploy chain that assembles calibration -> pipeline -> exporters ->
devices into one run."""

"""ONNX export, channel-group discovery, graph surgery, verification, TFLite and bundles."""

"""Run the board runner on a remote board over SSH (paramiko).

Copy the bundle folder (or the lone model) and the runner into a fresh remote folder, let the
runner check the bundle's hashes on the board, run it, fetch its JSON result and remove the remote
folder again, whatever happened. Every failure is one DeviceError line that says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import socket
import uuid
from dataclasses import replace
from pathlib import Path, PurePosixPath

import paramiko

from devices.errors import DeviceError
from devices.measurement import Measurement
from devices.profile import HOST_KEY_POLICIES, DeviceProfile, SshSettings, load_profile
from devices.runspec import (
    RUNNER_PATH,
    RunSpec,
    merge_spec,
    parse_runner_output,
    resolve_threads,
    runner_args,
)

BUNDLE_MANIFESTS = ("manifest.json", "SHA256SUMS")
TRANSFER_HASHES = ".fair-edge-transfer.sha256"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundle_files(model: Path, bundle_dir: Path | None) -> tuple[Path, dict[str, Path], str]:
    """(root, {relative posix path: local file}, model's relative path) of what goes to the board."""
    if bundle_dir is None:
        if not model.is_file():
            raise DeviceError(f"model file {model} does not exist: export the model first")
        return model.parent, {model.name: model}, model.name
    root = bundle_dir.resolve()
    if not root.is_dir():
        raise DeviceError(f"bundle folder {bundle_dir} does not exist: build the bundle first")
    model = model if model.is_absolute() else root / model
    model = model.resolve()
    if not model.is_file():
        raise DeviceError(f"model file {model} does not exist in the bundle {root}")
    try:
        rel = model.relative_to(root).as_posix()
    except ValueError:
        raise DeviceError(f"model {model} is not inside the bundle folder {root}") from None
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    return root, files, rel


def settings_for(
    profile: DeviceProfile, env: dict[str, str] | None = None, **overrides
) -> SshSettings:
    """The profile's SSH settings with environment and then explicit overrides applied."""
    settings = profile.ssh_settings(env)
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = replace(settings, **given)
    if settings.host_key_policy not in HOST_KEY_POLICIES:
        raise DeviceError(
            f"host_key_policy must be one of {', '.join(HOST_KEY_POLICIES)}, got {settings.host_key_policy!r}"
        )
    if not settings.host:
        var = "FAIR_EDGE_" + profile.name.upper().replace("-", "_") + "_HOST"
        raise DeviceError(
            f"no SSH host for profile {profile.name}: set {var} or FAIR_EDGE_SSH_HOST, "
            "or ssh.host in your own profile file"
        )
    return settings


def _target(s: SshSettings) -> str:
    return f"{s.user + '@' if s.user else ''}{s.host}:{s.port}"


def connect(s: SshSettings) -> paramiko.SSHClient:
    """An authenticated SSH client, or a DeviceError saying why not."""
    client = paramiko.SSHClient()
    target = _target(s)
    known_hosts = os.path.expanduser(s.known_hosts) if s.known_hosts else ""
    try:
        if known_hosts:
            if os.path.exists(known_hosts):
                client.load_host_keys(known_hosts)
        else:
            client.load_system_host_keys()
    except (OSError, paramiko.SSHException) as exc:
        raise DeviceError(
            f"cannot read known_hosts {known_hosts or '~/.ssh/known_hosts'}: {exc}"
        ) from None
    policy = (
        paramiko.AutoAddPolicy() if s.host_key_policy == "accept-new" else paramiko.RejectPolicy()
    )
    client.set_missing_host_key_policy(policy)
    key = os.path.expanduser(s.key) if s.key else None
    if key and not os.path.isfile(key):
        raise DeviceError(f"SSH key file {key} does not exist: set ssh.key or FAIR_EDGE_SSH_KEY")
    try:
        client.connect(
            s.host,
            port=int(s.port),
            username=s.user or None,
            key_filename=key,
            timeout=s.connect_timeout_s,
            banner_timeout=s.connect_timeout_s,
            auth_timeout=s.connect_timeout_s,
            allow_agent=key is None,
            look_for_keys=key is None,
        )
    except paramiko.BadHostKeyException:
        client.close()
        raise DeviceError(
            f"host key of {target} does not match known_hosts: the board was reinstalled or this "
            "is not your board; check it, then remove the stale known_hosts entry"
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise DeviceError(
            f"SSH authentication to {target} failed ({exc}): check the key (ssh.key / "
            "FAIR_EDGE_SSH_KEY) and that its public half is in the board's authorized_keys"
        ) from None
    except paramiko.ssh_exception.NoValidConnectionsError:
        client.close()
        raise DeviceError(
            f"cannot reach {target}: connection refused; is the board on and sshd listening on port {s.port}?"
        ) from None
    except TimeoutError:
        client.close()
        raise DeviceError(
            f"cannot reach {target}: no answer within {s.connect_timeout_s:g} s; check the address and network"
        ) from None
    except socket.gaierror as exc:
        client.close()
        raise DeviceError(f"cannot resolve SSH host {s.host!r}: {exc.strerror}") from None
    except paramiko.SSHException as exc:
        client.close()
        if "banner" in str(exc).lower() or "no existing session" in str(exc).lower():
            raise DeviceError(
                f"{target} accepted the connection but the SSH handshake did not complete within "
                f"{s.connect_timeout_s:g} s: is sshd on that port, is the board overloaded?"
            ) from None
        if "not found in known_hosts" in str(exc):
            raise DeviceError(
                f"host key of {target} is unknown: add it to known_hosts (ssh-keyscan -p {s.port} "
                f"{s.host}) or pass host_key_policy='accept-new'"
            ) from None
        raise DeviceError(f"SSH to {target} failed: {exc}") from None
    except OSError as exc:
        client.close()
        raise DeviceError(f"cannot reach {target}: {exc.strerror or exc}") from None
    if known_hosts and s.host_key_policy == "accept-new":
        with contextlib.suppress(OSError):
            Path(known_hosts).parent.mkdir(parents=True, exist_ok=True)
            client.save_host_keys(known_hosts)
    return client


def _exec(
    client: paramiko.SSHClient, cmd: str, timeout_s: float, target: str
) -> tuple[int, str, str]:
    try:
        _, stdout, stderr = client.exec_command(cmd, timeout=timeout_s)
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
        return stdout.channel.recv_exit_status(), out, err
    except TimeoutError:
        raise DeviceError(
            f"{target}: the command did not finish within {timeout_s:g} s (raise ssh.run_timeout_s "
            "or lower runs/min_duration)"
        ) from None
    except paramiko.SSHException as exc:
        raise DeviceError(f"{target}: SSH session failed: {exc}") from None


def _upload(sftp: paramiko.SFTPClient, remote: PurePosixPath, files: dict[str, Path]) -> None:
    made = {remote}
    for rel, local in files.items():
        dest = remote / rel
        for parent in reversed(dest.parents):
            if parent not in made and str(parent).startswith(str(remote)):
                with contextlib.suppress(OSError):
                    sftp.mkdir(str(parent))
                made.add(parent)
        sftp.put(str(local), str(dest))


def run_ssh(
    model_path: str | os.PathLike,
    profile: DeviceProfile | str,
    spec: RunSpec | None = None,
    *,
    bundle_dir: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    host: str | None = None,
    user: str | None = None,
    port: int | None = None,
    key: str | None = None,
    known_hosts: str | None = None,
    host_key_policy: str | None = None,
    python: str | None = None,
    work_dir: str | None = None,
    connect_timeout_s: float | None = None,
    run_timeout_s: float | None = None,
    check_thermal: bool = True,
    **overrides,
) -> Measurement:
    """Measure `model_path` on the profile's board; `bundle_dir` sends the whole bundle folder.

    With `check_thermal`, the profile's `thermal_check` command (e.g. `vcgencmd get_throttled`)
    runs on the board before and after the measurement and its output goes into
    `extra["thermal"]`, so a throttled run can be recognised.
    """
    profile = load_profile(profile) if isinstance(profile, str) else profile
    spec = merge_spec(spec, overrides)
    s = settings_for(
        profile,
        env,
        host=host,
        user=user,
        port=port,
        key=key,
        known_hosts=known_hosts,
        host_key_policy=host_key_policy,
        python=python,
        work_dir=work_dir,
        connect_timeout_s=connect_timeout_s,
        run_timeout_s=run_timeout_s,
    )
    root, files, model_rel = _bundle_files(
        Path(model_path), Path(bundle_dir) if bundle_dir else None
    )
    hashes = {rel: _sha256(p) for rel, p in files.items()}
    manifests = [m for m in BUNDLE_MANIFESTS if m in files]
    target = _target(s)
    client = connect(s)
    remote = PurePosixPath(s.work_dir) / f"run-{uuid.uuid4().hex[:12]}"
    try:
        code, _, err = _exec(
            client, f"mkdir -p {shlex.quote(str(remote))}", s.connect_timeout_s, target
        )
        if code != 0:
            raise DeviceError(f"{target}: cannot create work folder {remote}: {err.strip()}")
        sftp = client.open_sftp()
        try:
            _upload(sftp, remote, files)
            sftp.put(str(RUNNER_PATH), str(remote / "runner.py"))
            with sftp.open(str(remote / TRANSFER_HASHES), "w") as fh:
                fh.write("".join(f"{h}  {rel}\n" for rel, h in sorted(hashes.items())))
            run_spec = replace(spec, ort_profile="ort-profile" if spec.ort_profile else None)
            args = runner_args(run_spec, profile, model_rel)
            args += ["--hashes", TRANSFER_HASHES]
            for manifest in manifests:
                args += ["--hashes", manifest]
            args += ["--bundle-dir", ".", "--out", "result.json"]
            threads = resolve_threads(spec, profile)
            cmd = (
                f"cd {shlex.quote(str(remote))} && OMP_NUM_THREADS={threads or 1} "
                f"timeout {s.run_timeout_s:g} {s.python} runner.py "
                + " ".join(shlex.quote(a) for a in args)
            )
            thermal = {"before": _thermal(client, profile, target)} if check_thermal else {}
            code, out, err = _exec(client, cmd, s.run_timeout_s + 30, target)
            if check_thermal:
                thermal["after"] = _thermal(client, profile, target)
            if code == 124:
                raise DeviceError(
                    f"{target}: the runner did not finish within {s.run_timeout_s:g} s (raise "
                    "ssh.run_timeout_s or lower runs/min_duration)"
                )
            result = parse_runner_output(out, code, err, f"board {target}")
            if result.get("ok") and result.get("ort_profile") and spec.ort_profile:
                local = Path(f"{spec.ort_profile}_{PurePosixPath(result['ort_profile']).name}")
                local.parent.mkdir(parents=True, exist_ok=True)
                sftp.get(result["ort_profile"], str(local))
                result["ort_profile"] = str(local)
        finally:
            sftp.close()
    finally:
        with contextlib.suppress(Exception):
            _exec(client, f"rm -rf {shlex.quote(str(remote))}", s.connect_timeout_s, target)
        client.close()
    device = f"{profile.name} at {target} over SSH"
    return Measurement.from_runner(
        result,
        profile=profile.name,
        where="ssh",
        device=device,
        label=device,
        representative=True,
        extra={"remote_dir": str(remote), "bundle_files": sorted(files), "thermal": thermal},
    )


def _thermal(client: paramiko.SSHClient, profile: DeviceProfile, target: str) -> dict | None:
    """The board's throttling/temperature report (profile.thermal_check), at most 5 s of it."""
    if not profile.thermal_check:
        return None
    cmd = f"timeout 5 sh -c {shlex.quote(profile.thermal_check)} 2>&1"
    code, out, _ = _exec(client, cmd, 15, target)
    return {"command": profile.thermal_check, "exit_code": code, "output": out.strip()[-2000:]}

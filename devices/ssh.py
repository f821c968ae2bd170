"""Run the board runner on a remote board over SSH (paramiko).

Copy the bundle folder (or the lone model) and the runner into a fresh remote folder, let the
runner check the bundle's hashes on the board, run it, fetch its JSON result and remove the remote
folder again, whatever happened. Every failure is one DeviceError line that says what to do.

A lost connection cannot remove its folder, so every run folder lives under the work folder with
the RUN_PREFIX name and records the SSH server process that serves its connection; the next
connection removes the folders whose server process is gone and stops a runner left in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import socket
import time
import uuid
from collections.abc import Iterator
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
RUN_PREFIX = "fair-edge-run-"
OWNER_FILE = ".fair-edge-owner"
RUNNER_PID_FILE = ".fair-edge-runner-pid"
SIGNAL_MARK = "fair-edge-runner-signal"
STRAY_AGE_MIN = 10


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


def _lost(client: paramiko.SSHClient) -> bool:
    """Whether the connection is gone.

    paramiko closes the channels before it marks the transport inactive, so a channel that
    just closed gives its reader thread a moment to finish before the answer.
    """
    transport = client.get_transport()
    if transport is None:
        return True
    if transport.is_active():
        transport.join(1.0)
    return not transport.is_active()


def _lost_error(target: str, what: str) -> DeviceError:
    return DeviceError(
        f"connection to {target} lost during {what}; check the board/network and re-run "
        "(the next run removes the folder it left on the board)"
    )


def _exec(
    client: paramiko.SSHClient, cmd: str, timeout_s: float, target: str, what: str
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cmd` on the board; `what` names it in errors."""
    try:
        _, stdout, stderr = client.exec_command(cmd, timeout=timeout_s)
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
        code = stdout.channel.recv_exit_status()
    except TimeoutError:
        raise DeviceError(
            f"{target}: the command did not finish within {timeout_s:g} s (raise ssh.run_timeout_s "
            "or lower runs/min_duration)"
        ) from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if _lost(client):
            raise _lost_error(target, what) from None
        raise DeviceError(f"{target}: SSH session failed during {what}: {exc}") from None
    if code == -1:  # the channel closed without an exit status
        if _lost(client):
            raise _lost_error(target, what)
        raise DeviceError(
            f"{target}: {what} was killed on the board without an exit status (a signal the SSH "
            "server reported but did not pass on); check the board's kernel log (dmesg)"
        )
    return code, out, err


def _claim_work_folder(
    client: paramiko.SSHClient, s: SshSettings, remote: PurePosixPath, target: str
) -> None:
    """Make the run folder and remove the ones that lost connections left behind.

    A folder records the SSH server process of its connection ($PPID of the command); while that
    process lives the run may still be going (another client measuring), so it is kept. A folder
    without that record is kept for STRAY_AGE_MIN minutes, as it may be one just being made.
    A runner still running in a removed folder is stopped (only if its working folder is that
    folder, so a reused pid is never hit): it would load the board during this measurement.
    """
    parent, run = shlex.quote(str(remote.parent)), shlex.quote(str(remote))
    script = (
        f"mkdir -p {parent} && mkdir {run} && echo $PPID > {run}/{OWNER_FILE} || exit 1; "
        f"for d in {parent}/{RUN_PREFIX}*; do "
        f'[ -d "$d" ] && [ "${{d##*/}}" != {shlex.quote(remote.name)} ] || continue; '
        f'o=$(cat "$d/{OWNER_FILE}" 2>/dev/null); '
        'if [ -n "$o" ]; then kill -0 "$o" 2>/dev/null && continue; '
        f'elif [ -z "$(find "$d" -maxdepth 0 -mmin +{STRAY_AGE_MIN} 2>/dev/null)" ]; then continue; fi; '
        f'p=$(cat "$d/{RUNNER_PID_FILE}" 2>/dev/null); '
        'if [ -n "$p" ] && [ "/proc/$p/cwd" -ef "$d" ]; then kill "$p" 2>/dev/null; fi; '
        'rm -rf "$d"; done; exit 0'
    )
    code, _, err = _exec(client, script, s.connect_timeout_s, target, "creating the work folder")
    if code != 0:
        raise DeviceError(
            f"{target}: cannot create work folder {remote}: {err.strip() or f'exit code {code}'}; "
            "check ssh.work_dir (FAIR_EDGE_SSH_WORKDIR) and free space on the board"
        )


def _runner_command(remote: PurePosixPath, threads: int, s: SshSettings, args: list[str]) -> str:
    """The shell line that runs the runner and names the signal if one killed it.

    The shell sees a killed runner as exit code 128+N; its own `kill -l` names N, so the name
    is the board's. The runner's pid goes to a file so a later cleanup can stop an orphan.
    """
    return (
        f"cd {shlex.quote(str(remote))} && {{ OMP_NUM_THREADS={threads or 1} "
        f"timeout {s.run_timeout_s:g} {s.python} runner.py "
        + " ".join(shlex.quote(a) for a in args)
        + f" & echo $! > {RUNNER_PID_FILE}; wait $!; }}; s=$?; "
        'if [ "$s" -gt 128 ] && [ "$s" -le 192 ]; then '
        f'echo "{SIGNAL_MARK} $((s - 128)) $(kill -l "$s" 2>/dev/null)" >&2; fi; exit "$s"'
    )


def _killed_by(err: str) -> tuple[str, str | None]:
    """(stderr without the signal report, 'signal 9 (SIGKILL)' when the shell reported one)."""
    found = re.search(rf"^{SIGNAL_MARK} (\d+) ?(\S*)\s*$", err, re.MULTILINE)
    if found is None:
        return err, None
    number, name = found.groups()
    rest = err[: found.start()] + err[found.end() :]
    if not name:
        return rest, f"signal {number}"
    return rest, f"signal {number} ({name if name.startswith('SIG') else 'SIG' + name})"


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
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    remote = PurePosixPath(s.work_dir) / f"{RUN_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
    try:
        _claim_work_folder(client, s, remote, target)
        sftp = None
        try:
            with _transfer(client, target, "the upload of the bundle", remote):
                sftp = client.open_sftp()
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
            cmd = _runner_command(remote, resolve_threads(spec, profile), s, args)
            thermal = {"before": _thermal(client, profile, target)} if check_thermal else {}
            code, out, err = _exec(client, cmd, s.run_timeout_s + 30, target, "the measurement")
            if check_thermal:
                thermal["after"] = _thermal(client, profile, target)
            if code == 124:
                raise DeviceError(
                    f"{target}: the runner did not finish within {s.run_timeout_s:g} s (raise "
                    "ssh.run_timeout_s or lower runs/min_duration)"
                )
            result = _runner_result(out, code, err, target)
            if result.get("ok") and result.get("ort_profile") and spec.ort_profile:
                local = Path(f"{spec.ort_profile}_{PurePosixPath(result['ort_profile']).name}")
                local.parent.mkdir(parents=True, exist_ok=True)
                with _transfer(client, target, "fetching the ONNX Runtime profile", remote):
                    sftp.get(result["ort_profile"], str(local))
                result["ort_profile"] = str(local)
        finally:
            if sftp is not None:
                with contextlib.suppress(Exception):
                    sftp.close()
    finally:
        with contextlib.suppress(Exception):
            rm = f"rm -rf {shlex.quote(str(remote))}"
            _exec(client, rm, s.connect_timeout_s, target, "removing the work folder")
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


@contextlib.contextmanager
def _transfer(
    client: paramiko.SSHClient, target: str, what: str, remote: PurePosixPath
) -> Iterator[None]:
    """SFTP failures as one DeviceError: a lost connection, or what the board refused."""
    try:
        yield
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if _lost(client):
            raise _lost_error(target, what) from None
        raise DeviceError(
            f"{target}: {what} failed ({exc}); check free space and permissions in "
            f"{remote.parent} on the board"
        ) from None


def _runner_result(out: str, code: int, err: str, target: str) -> dict:
    """The runner's JSON result; a runner killed by a signal without one says which signal."""
    err, signal = _killed_by(err)
    try:
        return parse_runner_output(out, code, err, f"board {target}")
    except DeviceError:
        if signal is None:
            raise
    hint = (
        "the board's out-of-memory killer does this: check dmesg there, free memory or use a "
        "smaller model"
        if signal.startswith("signal 9 ")
        else "check the board's kernel log (dmesg) and the runtime on the board"
    )
    raise DeviceError(
        f"board {target}: the runner was killed by {signal} before it printed a result; {hint}"
    )


def _thermal(client: paramiko.SSHClient, profile: DeviceProfile, target: str) -> dict | None:
    """The board's throttling/temperature report (profile.thermal_check), at most 5 s of it."""
    if not profile.thermal_check:
        return None
    cmd = f"timeout 5 sh -c {shlex.quote(profile.thermal_check)} 2>&1"
    code, out, _ = _exec(client, cmd, 15, target, "the thermal check")
    return {"command": profile.thermal_check, "exit_code": code, "output": out.strip()[-2000:]}

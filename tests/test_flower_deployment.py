"""The Flower engine deployed: a SuperLink and SuperNodes on 127.0.0.1, each its own process,
driven by ``flwr run`` as an operator would. Hostile nodes, a killed SuperLink resumed, TLS with
SuperNode authentication, a node killed and restarted, a node unregistered mid-run.

Tiny random BERT, real MRPC slices. Flower and torch write only into temporary folders; every
process started is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flower_helpers import own_files, read_records, tiny_config
from hlora.config import RunConfig, replace, to_toml
from hlora.engines.flower.transport import REFUSED
from hlora.federation import build_federation
from hlora.protocol import TrainInstruction

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower App: pyproject.toml [tool.flwr.app]

# -- deployment on 127.0.0.1 --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _stop(*procs: subprocess.Popen, kill: bool = False) -> None:
    """Stop processes we started and every process below them, each by its PID.

    All of ``procs`` are signalled before any is waited for: their shutdowns overlap.
    """
    psutil = pytest.importorskip("psutil")
    family = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.extend(psutil.Process(proc.pid).children(recursive=True))
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        (proc.kill if kill else proc.terminate)()
    for proc in running:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            (child.kill if kill else child.terminate)()
    _, alive = psutil.wait_procs(family, timeout=15)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=15)


_SHORT_HEARTBEAT_SUPERNODE = """
import sys

import flwr.common.constant as constant
import flwr.supercore.heartbeat as heartbeat
import flwr.supernode.fleet_http_connection as connection
from flwr.supernode.cli import flower_supernode

for module in (constant, heartbeat, connection):
    assert hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"), module.__name__
    module.HEARTBEAT_DEFAULT_INTERVAL = constant.HEARTBEAT_MIN_INTERVAL
sys.exit(flower_supernode())
"""
"""``flower-supernode`` with Flower's shortest heartbeat interval (the SuperNode has no option
for it): the interval it declares to the SuperLink and the one its heartbeat thread keeps."""


_HOSTILE_NODE = """
# A hostile SuperNode, for tests: Python imports this module at the start of the SuperNode and of
# every ClientApp process it starts (PYTHONPATH); only the ClientApps answer messages, so only
# they load hlora and lie. HLORA_HOSTILE names what its TRAIN reply does in each round,
# comma-separated; the round's honest reply is computed first.
import os
import sys


def _lie(kind, update):
    import dataclasses

    import torch

    from hlora.aggregation import LoraFactors

    if kind == "huge-count":
        return dataclasses.replace(update, num_examples=2**62)
    if kind == "nan":
        extras = {k: torch.full_like(v, float("nan")) for k, v in update.extras.items()}
        return dataclasses.replace(update, extras=extras)
    if kind == "oversized":
        big = {n: LoraFactors(A=f.A * 1e3, B=f.B * 1e3) for n, f in update.factors.items()}
        return dataclasses.replace(update, factors=big)
    if kind == "as-client00":
        return dataclasses.replace(update, client_id="client00")
    raise ValueError(kind)


def _patch():
    import dataclasses

    from hlora.engines.flower import codec, node

    honest_train = node.train

    def hostile_train(local, node_config, content):
        instruction = codec.decode_instruction(content)
        reply = codec.decode_reply(honest_train(local, node_config, content), instruction.client_id)
        kind = os.environ["HLORA_HOSTILE"].split(",")[instruction.round_num - 1]
        return codec.encode_reply(dataclasses.replace(reply, update=_lie(kind, reply.update)))

    node.train = hostile_train


if os.path.basename(sys.argv[0] if sys.argv else "").startswith("flwr-clientapp"):
    _patch()
"""


class _WithoutClients:
    """The in-process transport, with ``absent`` clients failing every round (the reference of
    a federation whose hostile nodes are all dropped)."""

    def __init__(self, inner: object, absent: set[str]) -> None:
        self.inner = inner
        self.absent = absent

    def run_round(self, instructions: list[TrainInstruction]) -> object:
        from hlora.protocol import ClientFailure, RoundResult

        kept = [i for i in instructions if i.client_id not in self.absent]
        result = self.inner.run_round(kept)  # type: ignore[attr-defined]
        gone = [ClientFailure(i.client_id, "absent") for i in instructions if i not in kept]
        return RoundResult(result.replies, [*result.failures, *gone])


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, each its own process.

    Args:
        home: Folder for ``FLWR_HOME``, logs and state.
        num_nodes: SuperNodes; node ``i`` declares ``partition-id=i`` unless ``node_configs``.
        node_configs: Each node's ``--node-config`` string.
    """

    FEDERATION = "hlora-local"

    def __init__(self, home: Path, num_nodes: int, node_configs: list[str] | None = None) -> None:
        self.home = home
        self.num_nodes = num_nodes
        self.node_configs = node_configs or [
            f"partition-id={i} num-partitions={num_nodes}" for i in range(num_nodes)
        ]
        self.port = _free_port()
        self.env = dict(os.environ)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            return subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=self.home,
                start_new_session=True,
            )

    def start_tls(self, certs: Path) -> None:
        """A SuperLink over TLS with SuperNode authentication; the CLI trusts ``certs/ca.crt``."""
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.FEDERATION}"\n\n'
            f"[superlink.{self.FEDERATION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{certs / "ca.crt"}"\n'
        )
        self.superlink = self._spawn(
            "superlink",
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                "--ssl-ca-certfile",
                str(certs / "ca.crt"),
                "--ssl-certfile",
                str(certs / "server.pem"),
                "--ssl-keyfile",
                str(certs / "server.key"),
                "--enable-supernode-auth",
            ],
        )
        _wait_for_port(self.port)

    def tls_supernode(
        self,
        name: str,
        certs: Path,
        key: Path,
        node_config: str,
        *,
        short_heartbeat: bool = False,
    ) -> subprocess.Popen:
        """A SuperNode that reaches the TLS SuperLink and signs with ``key`` (not waited for).

        With ``short_heartbeat`` it declares Flower's shortest heartbeat interval (10 s, not
        30 s): killed, the SuperLink marks it offline after 20 s instead of 60 s.
        """
        command = (
            [sys.executable, "-c", _SHORT_HEARTBEAT_SUPERNODE]
            if short_heartbeat
            else [str(Path(sys.executable).parent / "flower-supernode")]
        )
        return self._spawn(
            name,
            [
                *command,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(key),
                "--port",
                str(_free_port()),
                "--node-config",
                node_config,
            ],
        )

    def start(
        self, database: Path | None = None, node_env: dict[int, dict[str, str]] | None = None
    ) -> None:
        """The SuperLink (its state in ``database``, else in memory), then the SuperNodes;
        node ``i`` gets ``node_env[i]`` on top of the environment."""
        flwr_home = Path(self.env["FLWR_HOME"])
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.FEDERATION}"\n\n[superlink.{self.FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.start_superlink(database=database)
        bin_dir = Path(sys.executable).parent
        for i in range(self.num_nodes):
            self.nodes.append(
                self._spawn(
                    f"node{i}",
                    [
                        str(bin_dir / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        self.node_configs[i],
                    ],
                    (node_env or {}).get(i),
                )
            )

    def start_superlink(self, name: str = "superlink", database: Path | None = None) -> None:
        """An insecure SuperLink on ``self.port``, waited for; its state in ``database`` (an
        SQLite file that outlives it), else in memory."""
        state = ["--database", str(database)] if database is not None else []
        self.superlink = self._spawn(
            name,
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                "--insecure",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                *state,
            ],
        )
        _wait_for_port(self.port)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and everything below it (the ServerApp process of a run)."""
        if self.superlink is not None:
            _stop(self.superlink, kill=True)

    def run(self, app_dir: Path, run_config: str, name: str = "flwr-run") -> subprocess.Popen:
        """``flwr run APP FEDERATION --stream --run-config ...`` (not waited for)."""
        bin_dir = Path(sys.executable).parent
        return self._spawn(
            name,
            [
                str(bin_dir / "flwr"),
                "run",
                str(app_dir),
                self.FEDERATION,
                "--stream",
                "--run-config",
                run_config,
            ],
        )

    def stop(self) -> None:
        """The SuperNodes (together; each deactivates itself), then the SuperLink (killed: no
        test looks at its shutdown, which waits seconds for connections to close)."""
        _stop(*self.nodes)
        if self.superlink is not None:
            _stop(self.superlink, kill=True)

    def tail(self, lines: int = 30) -> str:
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"== {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


def _write_config(config: RunConfig, path: Path) -> Path:
    path.write_text(to_toml(config), encoding="utf-8")
    return path


def _run_config(
    config_path: Path,
    run_dir: Path,
    round_timeout: int,
    node_data: str = "simulated-partition",
    eval_data: str = "",
) -> str:
    return (
        f'hlora-config="{config_path}" run-dir="{run_dir}" round-timeout={round_timeout} '
        f'node-data="{node_data}" eval-data="{eval_data}"'
    )


def _wait(proc: subprocess.Popen, deployment: LocalDeployment, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {timeout:.0f} s\n{deployment.tail()}")


HOSTILE_ROUNDS = {
    "client02": ("huge-count", "oversized"),
    "client03": ("nan", "as-client00"),
}
"""What each hostile node's TRAIN reply does in rounds 1 and 2. Every kind of lie (another
rank or scaling too) is checked through the round loop in ``test_trust.py``; these four cross
Flower's messages: a count, a norm, NaNs, another client's name."""
HOSTILE_REASONS = {
    "huge-count": "claims 4611686018427387904 training examples",
    "oversized": "exceeds trust.update_norm_bound = 50",
    "nan": "non-finite",
    "as-client00": "malformed reply: reply is for client 'client00'",
}


@pytest.mark.distributed
def test_a_deployment_drops_hostile_nodes_and_resumes_after_its_superlink_is_killed(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flower_env: Path
) -> None:
    """Four SuperNodes on loopback, two rounds; two of them are hostile (``HOSTILE_ROUNDS``:
    each round another lie). Once round 1 is checkpointed the SuperLink is SIGKILLed with the
    ServerApp below it (and the ``flwr run`` that streams its log); a new SuperLink starts on
    the same port and database, the running SuperNodes reconnect to it, and ``flwr run`` on the
    same run folder resumes from the checkpoint.

    Lost: nothing. Every hostile reply is dropped with its reason, and every round equals an
    in-process run in which the two hostile clients never answer."""
    from hlora.engines.inprocess import InProcessTransport
    from hlora.federation import make_loop
    from hlora.report import RoundProgress

    config = tiny_config(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{
            "federation.num_clients": 4,
            "federation.rounds": 2,
            "data.train_limit": 64,
            "data.partition": '"iid"',
            "trust.update_norm_bound": 50.0,
        },
    )
    config_path = _write_config(config, tmp_path / "run.toml")
    run_dir = tmp_path / "deployed"
    hostile_path = tmp_path / "hostile"
    hostile_path.mkdir()
    (hostile_path / "sitecustomize.py").write_text(_HOSTILE_NODE)
    pythonpath = os.pathsep.join(p for p in (str(hostile_path), os.environ.get("PYTHONPATH")) if p)
    node_env = {
        int(cid[-1]): {"PYTHONPATH": pythonpath, "HLORA_HOSTILE": ",".join(kinds)}
        for cid, kinds in HOSTILE_ROUNDS.items()
    }
    deployment = LocalDeployment(flower_env, num_nodes=4)
    runs: list[subprocess.Popen] = []
    try:
        database = flower_env / "superlink-state.db"
        deployment.start(database, node_env)
        runs.append(deployment.run(APP_DIR, _run_config(config_path, run_dir, 300)))
        # The reference runs in process while the deployment starts up.
        federation = build_federation(replace(config, output={"name": "inprocess"}))
        reference_dir = tmp_path / "inprocess"
        reference_dir.mkdir()
        transport = InProcessTransport(federation.runtime, federation.train_features)
        make_loop(
            federation,
            reference_dir,
            RoundProgress(2, enabled=False),
            _WithoutClients(transport, set(HOSTILE_ROUNDS)),  # type: ignore[arg-type]
        ).run()
        deadline = time.monotonic() + 600
        while not ((run_dir / "checkpoint.safetensors").exists() and read_records(run_dir)):
            if runs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"round 1 never finished\n{deployment.tail()}")
            time.sleep(0.2)  # poll interval of a wait on a condition with a deadline
        deployment.kill_superlink()
        _stop(runs[0], kill=True)
        before = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(before) == 1, "the run went past round 1 before it could be killed"
        deployment.start_superlink("superlink-restarted", database)
        runs.append(deployment.run(APP_DIR, _run_config(config_path, run_dir, 300), "rerun"))
        _wait(runs[1], deployment, 600)
        assert (run_dir / "summary.json").is_file(), deployment.tail()
    finally:
        _stop(*runs)
        deployment.stop()
    # Resumed, not redone: the round finished before the kill is the same line, timings in.
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before
    ref, got = read_records(reference_dir), read_records(run_dir)
    assert [r["round"] for r in got] == [1, 2]
    clients = json.loads((run_dir / "clients.json").read_text())
    assert [c["client_id"] for c in clients] == [f"client{k:02d}" for k in range(4)]
    assert json.loads((run_dir / "dropped_nodes.json").read_text()) == []
    for a, b in zip(ref, got, strict=True):
        dropped = {d["client_id"]: d["reason"] for d in b["dropped"]}
        assert sorted(dropped) == sorted(HOSTILE_ROUNDS), b["dropped"]
        for cid, kinds in HOSTILE_ROUNDS.items():
            assert HOSTILE_REASONS[kinds[b["round"] - 1]] in dropped[cid], dropped[cid]
        accepted = {c["client_id"]: c["accepted"] for c in b["clients"]}
        assert accepted == {f"client{k:02d}": k < 2 for k in range(4)}
        assert [c["bytes_received"] for c in b["clients"][:2]] == [
            c["bytes_received"] for c in a["clients"][:2]
        ]
        assert b["eval"]["accuracy"] == a["eval"]["accuracy"]
        assert math.isclose(b["eval"]["loss"], a["eval"]["loss"], rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(b["train_loss"], a["train_loss"], rel_tol=1e-4, abs_tol=1e-5)


# -- TLS and SuperNode authentication on 127.0.0.1 -----------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(folder: Path) -> None:
    """A CA (``ca.crt``) and a server certificate for 127.0.0.1 it signed (``server.pem``)."""
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *curve,
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=hlora-test-ca",
        cwd=folder,
    )
    _openssl(
        "req",
        *curve,
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=superlink",
        cwd=folder,
    )
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
        cwd=folder,
    )


def _make_node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format: ``path`` (private), ``path.pub``."""
    if shutil.which("ssh-keygen"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    Path(f"{path}.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )


def _flwr_cli(deployment: LocalDeployment, *args: str) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS`` against the deployment's SuperLink (bounded: 60 s)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        env=deployment.env,
        cwd=deployment.home,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _listed_nodes(deployment: LocalDeployment) -> dict[str, str]:
    """Node id -> status, from ``flwr supernode list --format json``."""
    out = _flwr_cli(deployment, "supernode", "list", deployment.FEDERATION, "--format", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    listing = json.loads(out.stdout[out.stdout.index("{") :])
    assert listing["success"], listing
    return {str(n["node-id"]): str(n["status"]) for n in listing["nodes"]}


def _register(deployment: LocalDeployment, public_key: Path) -> str:
    """Register a SuperNode key with ``flwr supernode register``; the node id it was given."""
    args = ["supernode", "register", str(public_key), deployment.FEDERATION, "--format", "json"]
    deadline = time.monotonic() + 60
    while True:
        reg = _flwr_cli(deployment, *args)
        if reg.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # the port may open before the Control API answers
    assert reg.returncode == 0, reg.stdout + reg.stderr + deployment.tail()
    answer = json.loads(reg.stdout[reg.stdout.index("{") :])
    assert answer["success"], answer
    return str(answer["node-id"])


def _wait_for_line(
    log: Path, text: str, deployment: LocalDeployment, timeout: float, *, watch: subprocess.Popen
) -> None:
    """Poll ``log`` until it holds ``text``; fail when ``watch`` exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text(errors="replace")):
        if time.monotonic() > deadline or watch.poll() is not None:
            pytest.fail(f"{log.name} has no {text!r} after {timeout:.0f} s\n{deployment.tail()}")
        time.sleep(0.2)


@pytest.mark.distributed
def test_flower_tls_auth_run_with_a_supernode_killed_mid_round_and_restarted(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flower_env: Path
) -> None:
    """A whole training run over TLS with SuperNode authentication, nodes on their own data
    (no shared task anywhere: the config's data folder does not exist). One deployment for:

    - authentication: three keys registered with ``flwr supernode register`` over TLS are
      listed as registered; the registered SuperNodes come online under the ids registration
      gave them. Once round 1 runs, a SuperNode with an unknown key tries to join: it is refused
      and exits non-zero, never a node.
    - a node dying mid-round: the node on 22 examples is killed (SIGKILL, with its ClientApp)
      while it trains round 2. The run goes on without it: that client is dropped with the
      reason in round 2 and in round 3, whose message was sent while the SuperLink knew it
      offline; the node on 10 examples loses nothing (accepted in every round).
    - its restart: started again with the same key once round 3 was sent, it keeps its node id,
      so it is the same client (never a late node), and takes part again up to the last round.
    - a node removed mid-run: once round 4 is sent, the node on 16 examples has its key
      unregistered (``flwr supernode unregister``). It took part in rounds 1-3; round 5 drops
      it with the reason, and the run ends with the other two.

    The killed node declares a 10 s heartbeat (the others Flower's 30 s): the SuperLink marks it
    offline, and round 2 ends, 20 s after the kill instead of 60 s.
    """
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed")
    config = tiny_config(
        tiny_bert_dir, tmp_path / "no-shared-task", tmp_path, **{"federation.rounds": 5}
    )
    config_path = _write_config(config, tmp_path / "run.toml")
    own, dev = own_files(glue_dir, tmp_path / "own", [10, 16, 22])
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certificates(certs)
    for name in ("key0", "key1", "key2", "stranger"):
        _make_node_key(tmp_path / name)
    deployment = LocalDeployment(flower_env, num_nodes=0)

    def supernode(name: str, key: str, k: int, short_heartbeat: bool = False) -> subprocess.Popen:
        proc = deployment.tls_supernode(
            name, certs, tmp_path / key, f'own-data="{own[k]}"', short_heartbeat=short_heartbeat
        )
        deployment.nodes.append(proc)
        return proc

    run_dir = tmp_path / "deployed"
    flwr_run = None
    try:
        deployment.start_tls(certs)
        # The CLI talks to the SuperLink over TLS (root-certificates in FLWR_HOME/config.toml).
        ids = [_register(deployment, tmp_path / f"key{k}.pub") for k in range(3)]
        listed = _listed_nodes(deployment)
        assert listed == dict.fromkeys(ids, "registered") and len(set(ids)) == 3, listed

        nodes = [supernode(f"node{k}", f"key{k}", k, short_heartbeat=k == 2) for k in range(3)]
        # The registered ones are online, under the ids registration gave them.
        for k, node in enumerate(nodes):
            _wait_for_line(
                flower_env / f"node{k}.log", f"SuperNode ID: {ids[k]}", deployment, 90, watch=node
            )
        assert _listed_nodes(deployment) == dict.fromkeys(ids, "online")

        flwr_run = deployment.run(APP_DIR, _run_config(config_path, run_dir, 300, "own", str(dev)))
        # Mid-run, a SuperNode with an unknown key tries to join (checked once the run ends).
        _wait_for_line(flower_env / "node0.log", "ROUND 1]", deployment, 400, watch=flwr_run)
        stranger = supernode("stranger", "stranger", 0)
        # Kill node 2 while it trains round 2: its SuperNode logs the round-2 message.
        _wait_for_line(flower_env / "node2.log", "ROUND 2]", deployment, 400, watch=flwr_run)
        _stop(nodes[2], kill=True)
        # Round 2 ends once the SuperLink marks node 2 offline; round 3 is sent while it is.
        _wait_for_line(flower_env / "node0.log", "ROUND 3]", deployment, 400, watch=flwr_run)
        listed = _listed_nodes(deployment)
        assert listed[ids[2]] == "offline", listed
        restarted_node = supernode("node2-restarted", "key2", 2)  # same key: same node id
        _wait_for_line(
            flower_env / "node2-restarted.log",
            f"SuperNode ID: {ids[2]}",
            deployment,
            90,
            watch=restarted_node,
        )
        listed = _listed_nodes(deployment)
        assert listed == dict.fromkeys(ids, "online"), listed  # the stranger never became one
        # Remove node 1 from the federation once round 4 is sent.
        _wait_for_line(flower_env / "node0.log", "ROUND 4]", deployment, 400, watch=flwr_run)
        removed = _flwr_cli(deployment, "supernode", "unregister", ids[1], deployment.FEDERATION)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        _wait(flwr_run, deployment, 600)
        assert (run_dir / "summary.json").is_file(), deployment.tail()
        assert _listed_nodes(deployment)[ids[1]] == "unregistered"
        # The unknown key was refused: that SuperNode gave up and exited non-zero.
        try:
            code = stranger.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the unregistered SuperNode still runs after 90 s\n{deployment.tail()}")
        log = (flower_env / "stranger.log").read_text(errors="replace")
        assert code != 0, log
        assert "Failed to activate SuperNode" in log, log
        assert "No SuperNode found with the given public key" in (
            flower_env / "superlink.log"
        ).read_text(errors="replace")
    finally:
        if flwr_run is not None:
            _stop(flwr_run)
        deployment.stop()
    clients = json.loads((run_dir / "clients.json").read_text())
    # Clients in node id order, each with all of its own file's examples, accepted at join
    # time, under the registered node ids only.
    assert [c["client_id"] for c in clients] == ["client00", "client01", "client02"]
    assert [c["node_id"] for c in clients] == sorted(c["node_id"] for c in clients)
    assert sorted(str(c["node_id"]) for c in clients) == sorted(ids)
    assert sorted(c["num_examples"] for c in clients) == [10, 16, 22]
    assert {c["data_mode"] for c in clients} == {"own"}
    killed = next(c for c in clients if str(c["node_id"]) == ids[2])
    assert killed["num_examples"] == 22
    restarted = killed["client_id"]
    kept = next(c for c in clients if str(c["node_id"]) == ids[0])["client_id"]
    gone = next(c for c in clients if str(c["node_id"]) == ids[1])["client_id"]
    records = read_records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["dropped"] == []
    accepted = [{c["client_id"]: c["accepted"] for c in r["clients"]} for r in records]
    assert all(a[kept] for a in accepted)  # node 0 loses nothing
    assert [a[gone] for a in accepted[:3]] == [True, True, True]
    assert accepted[0][restarted]
    for record in records[1:3]:  # round 2: killed during it; round 3: known offline
        dropped = record["dropped"]
        assert [d["client_id"] for d in dropped] == [restarted]
        assert f"node {ids[2]}" in dropped[0]["reason"]
        assert accepted[record["round"] - 1] == {c["client_id"]: c is not killed for c in clients}
    back = [r for r, a in enumerate(accepted, start=1) if r > 3 and a[restarted]]
    assert back and back[-1] == 5, accepted  # it takes part again, to the last round
    # Round 5 was sent after node 1's key was unregistered: the SuperLink did not take its
    # message, so the round dropped it at once, with that reason (no wait for a timeout).
    (dropped,) = records[4]["dropped"]
    assert dropped == {"client_id": gone, "reason": f"node {ids[1]}: error 5: {REFUSED}"}
    assert accepted[4] == {kept: True, gone: False, restarted: True}
    for record in records:
        assert {d["client_id"] for d in record["dropped"]} <= {restarted, gone}
        assert record["bytes_received"] > 0 and "eval" in record
    # Neither the stranger nor the restarted node (back under its registered id) is a late node.
    assert json.loads((run_dir / "dropped_nodes.json").read_text()) == []

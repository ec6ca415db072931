"""Per-round overhead of a Flower deployment on 127.0.0.1, before and after cheaper rounds.

A deployed SuperNode starts a fresh ``flwr-clientapp`` process for every message, which imports
torch / transformers / peft, loads the model and gets its tokenized examples. This benchmark
measures what that costs, in two parts:

**stages** -- one fresh Python process per setting does what a ClientApp process does for one
``TRAIN`` message and times each stage: import the client app, load the model and the LoRA bank
(``client_runtime``), get the node's features, train one round. Settings:

- ``before``: the node's slice of the shared task (``simulated-partition``), read, partitioned
  and tokenized in the process (what every round did before the cache);
- ``own-nocache``: the node's own file, read and tokenized in the process (``cache-dir=none``);
- ``after``: the node's own file, its features read from the node's disk cache (warm).

**deployment** -- a SuperLink and ``--nodes`` SuperNodes on loopback, ``flwr run`` for
``--rounds`` rounds, once ``before`` (simulated partitions, no cache, the server pulling for
replies every 3 s as Flower's ``send_and_receive`` does) and once ``after`` (own files, cache
on, the server pulling every 0.25 s: run config ``reply-poll``; the SuperNodes' SuperExec
polling for new tasks every ``--superexec-poll`` s instead of Flower's 1 s, through the
environment variable ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).

Per round, from the server's ``metrics.jsonl``: ``overhead = round_time_s - max(client training
seconds)`` (the clients train in parallel; the round cannot end before the slowest). The
overhead holds Flower's polling (an idle SuperNode pulls every 3 s, its SuperExec looks for new
tasks every 1 s, the ServerApp pulls for replies), the ClientApp process start, its imports,
model load and features, and the transfers. The nodes' logs split it: each ClientApp logs how
long its process had been up when the message reached hlora (``startup``: Flower's entry point
and the imports) and how long hlora took over it. For the node that finished last,
``node = startup + handling``; ``in hlora`` is its handling minus the round's training, and
``flower = round_time_s - node`` is what neither process saw: the SuperNode's pull of the
message, the SuperExec's wait before it starts the process, the push of the reply and the
server's pull.

On loopback every node shares the machine's cores with the others and with the SuperLink and
ServerApp; each SuperNode (and so its ClientApp processes) gets ``--node-threads`` torch threads
(default: the cores divided among the nodes), as an operator co-locating nodes would set.

Each node holds ``--examples`` MRPC training pairs (default: the whole training set split over
the nodes) and trains ``--epochs`` of them a round (default 0.02: a few steps, so the overhead
is visible). Prints a table per part, then the ratio before / after, then one JSON line.

Examples:
    python benchmarks/flower_rounds.py --data-dir ../shared/data/glue
    python benchmarks/flower_rounds.py --part stages --model minilm
    python benchmarks/flower_rounds.py --model smollm2-135m --set 'model.task_type="causal-lm"'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parents[1]

_STAGES = r"""
import json, sys, time
t0 = time.perf_counter()
import hlora.engines.flower.client_app  # noqa: F401  (what flwr-clientapp imports)
from hlora.config import load_config
from hlora.engines.flower import node
from hlora.protocol import TrainInstruction
t1 = time.perf_counter()
args = json.loads(sys.argv[1])
config = load_config(None, tuple(args["overrides"]))
runtime, backbone = node.client_runtime(config)
t2 = time.perf_counter()
data = node.NodeData.from_node_config(args["node"])
features = node.node_features(config, backbone, data)
t3 = time.perf_counter()
instruction = TrainInstruction(
    client_id="client00", round_num=1, rank=max(config.federation.ranks),
    scaling=config.model.lora_scaling, factors=None,
    extras=runtime.bank.get_extras(max(config.federation.ranks)), init_seed=1, train_seed=1,
)
reply = runtime.train_client(instruction, features)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "model_s": t2 - t1, "features_s": t3 - t2,
                  "train_s": t4 - t3, "examples": len(features), "steps": reply.steps}))
"""


def _overrides(args: argparse.Namespace, out: Path, per_node: int) -> list[str]:
    return [
        f'model.name="{args.model}"',
        f'data.data_dir="{args.data_dir}"',
        f"data.train_limit={per_node * args.nodes}",
        f"data.dev_limit={args.dev_limit}",
        'data.partition="iid"',
        f"federation.num_clients={args.nodes}",
        f"federation.min_clients={args.nodes}",
        f"federation.rounds={args.rounds}",
        "federation.ranks=[4, 8]",
        f"train.local_epochs={args.epochs}",
        "train.batch_size=16",
        'train.device="cpu"',
        f'output.dir="{out}"',
        "output.progress=false",
        *args.set,
    ]


def _own_files(args: argparse.Namespace, folder: Path, per_node: int) -> list[Path]:
    from hlora.data.files import columns
    from hlora.data.glue import load_task

    train = load_task("mrpc", args.data_dir).train
    a, b, y = columns("mrpc")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(args.nodes):
        rows = train[k * per_node : (k + 1) * per_node]
        path = folder / f"node{k}.jsonl"
        path.write_text(
            "".join(json.dumps({a: e.text_a, b: e.text_b, y: e.label}) + "\n" for e in rows)
        )
        files.append(path)
    return files


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name, sub in [
        ("FLWR_HOME", "flwr"),
        ("RAY_TMPDIR", "ray"),
        ("UV_CACHE_DIR", "uv"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ]:
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(home / sub)
    env.update(FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stages(args: argparse.Namespace, home: Path, per_node: int) -> dict[str, dict[str, Any]]:
    """Each stage of one ClientApp process, per setting (a fresh process each)."""
    files = _own_files(args, home, per_node)
    overrides = _overrides(args, home / "runs", per_node)
    cache = home / "cache"
    settings = {
        "before": {"partition-id": 0, "num-partitions": args.nodes, "cache-dir": "none"},
        "own-nocache": {"own-data": str(files[0]), "cache-dir": "none"},
        "after": {"own-data": str(files[0]), "cache-dir": str(cache)},
    }
    env = _env(home)
    results = {}
    for name, node in [("warm-up", settings["after"]), *settings.items()]:
        done = subprocess.run(
            [sys.executable, "-c", _STAGES, json.dumps({"overrides": overrides, "node": node})],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        if name != "warm-up":  # the first fills the cache and the page cache
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process this benchmark started, and its children, by PID."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        _, alive = psutil.wait_procs([psutil.Process(proc.pid), *family], timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)


def deployment(
    args: argparse.Namespace, home: Path, per_node: int, setting: str
) -> list[dict[str, float]]:
    """One loopback deployment run; per round its time, the slowest client and the overhead."""
    work = home / setting
    work.mkdir(parents=True)
    env = _env(work)
    env["OMP_NUM_THREADS"] = str(args.node_threads)  # the SuperNodes and their ClientApps
    if setting == "after" and args.superexec_poll > 0:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)
    port = _free_port()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    config_path = work / "run.toml"
    from hlora.config import load_config, to_toml

    config_path.write_text(to_toml(load_config(None, tuple(_overrides(args, work, per_node)))))
    if setting == "before":
        nodes = [
            f'partition-id={k} num-partitions={args.nodes} cache-dir="none"'
            for k in range(args.nodes)
        ]
        run_config = 'node-data="simulated-partition" reply-poll=3.0'  # Flower's own pause
    else:
        files = _own_files(args, work, per_node)
        nodes = [f'own-data="{f}" cache-dir="{work / "cache"}"' for f in files]
        run_config = 'node-data="own"'
    run_dir = work / "run"
    run_config += f' hlora-config="{config_path}" run-dir="{run_dir}" round-timeout=900'
    bin_dir = Path(sys.executable).parent
    procs: list[subprocess.Popen] = []

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        with (work / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    try:
        spawn(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_for_port(port, 60)
        for k, node_config in enumerate(nodes):
            spawn(
                f"node{k}",
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    node_config,
                ],
            )
        flwr = spawn(
            "flwr-run",
            [
                str(bin_dir / "flwr"),
                "run",
                str(APP_DIR),
                "bench",
                "--stream",
                "--run-config",
                run_config,
            ],
        )
        flwr.wait(timeout=args.timeout)
    finally:
        for proc in reversed(procs):
            _stop(proc)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise RuntimeError(f"the {setting} run wrote no metrics: see the logs under {work}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    logs = [(work / f"node{k}.log").read_text(errors="replace") for k in range(len(nodes))]
    return round_overheads(records, node_timings(logs))


_HANDLED = re.compile(
    r"hlora: (\w+) round (\S+) handled in ([\d.]+) s by a ClientApp process up ([\d.]+) s"
)


def node_timings(logs: list[str]) -> dict[int, list[tuple[float, float]]]:
    """Per round, each node's ``(startup_s, handling_s)`` of its ``TRAIN`` message, from the
    line each ClientApp logs (:mod:`hlora.engines.flower.client_app`)."""
    timings: dict[int, list[tuple[float, float]]] = {}
    for log in logs:
        for kind, round_num, handled, age in _HANDLED.findall(log):
            if kind == "train" and round_num.isdigit():
                timings.setdefault(int(round_num), []).append((float(age), float(handled)))
    return timings


def round_overheads(
    records: list[dict[str, Any]], timings: dict[int, list[tuple[float, float]]] | None = None
) -> list[dict[str, float]]:
    """Per round of ``metrics.jsonl``: its time, the slowest client's training and the rest.

    ``overhead_s = round_time_s - max(client seconds)``; a client without a reply (dropped)
    counts 0 s of training. With the nodes' ``timings`` (:func:`node_timings`), the node that
    finished last splits the overhead: ``startup_s`` (its process before hlora), ``hlora_s``
    (its handling minus the training) and ``flower_s`` (the round minus that node's process).
    """
    rounds = []
    for record in records:
        train = max((c["seconds"] or 0.0 for c in record["clients"]), default=0.0)
        row = {
            "round": record["round"],
            "round_s": record["round_time_s"],
            "train_s": train,
            "overhead_s": record["round_time_s"] - train,
            "dropped": len(record["dropped"]),
        }
        if timings and timings.get(record["round"]):
            startup, handled = max(timings[record["round"]], key=sum)
            row.update(
                startup_s=startup,
                hlora_s=handled - train,
                flower_s=record["round_time_s"] - startup - handled,
            )
        rounds.append(row)
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="model alias, folder or hub id")
    parser.add_argument("--data-dir", default=os.environ.get("HLORA_DATA_DIR", ""))
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=0, help="pairs per node (0: all)")
    parser.add_argument("--epochs", type=float, default=0.02, help="local epochs a round")
    parser.add_argument("--dev-limit", type=int, default=64)
    parser.add_argument("--part", choices=["stages", "deployment", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="a configuration override, e.g. --set 'model.task_type=\"causal-lm\"'",
    )
    parser.add_argument(
        "--superexec-poll",
        type=float,
        default=0.1,
        help="after: seconds between the SuperExec's task polls (0: Flower's default, 1 s)",
    )
    parser.add_argument(
        "--node-threads",
        type=int,
        default=0,
        help="torch threads of each SuperNode's ClientApps (0: the cores divided among the nodes)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=["before", "after"],
        default=["before", "after"],
        help="deployment: which settings to run (both: their ratio too)",
    )
    args = parser.parse_args(argv)
    args.node_threads = args.node_threads or max(1, (os.cpu_count() or 1) // args.nodes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what it started (finally)
    if not args.data_dir:
        parser.error("give --data-dir (the GLUE folder) or set HLORA_DATA_DIR")
    from hlora.data.glue import load_task

    per_node = args.examples or len(load_task("mrpc", args.data_dir).train) // args.nodes
    print(
        f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, model {args.model}, "
        f"{args.nodes} nodes x {per_node} MRPC pairs, {args.epochs} epochs a round, "
        f"{args.node_threads} torch thread(s) per node"
    )
    home = Path(tempfile.mkdtemp(prefix="hlora-bench-", dir="/tmp"))
    out: dict[str, Any] = {"model": args.model, "nodes": args.nodes, "per_node": per_node}
    try:
        if args.part in ("stages", "both"):
            res = stages(args, home / "stages", per_node)
            print(
                f"{'setting':<12} {'import s':>9} {'model s':>8} {'features s':>11} {'train s':>8}"
            )
            for name, r in res.items():
                print(
                    f"{name:<12} {r['import_s']:>9.2f} {r['model_s']:>8.2f} "
                    f"{r['features_s']:>11.3f} {r['train_s']:>8.2f}"
                )
            before = res["before"]["features_s"]
            after = res["after"]["features_s"]
            print(f"features before / after: {before / after:.1f}x")
            out["stages"] = res
        if args.part in ("deployment", "both"):
            summary = {}
            for setting in args.settings:
                rounds = deployment(args, home, per_node, setting)
                print(
                    f"{setting}: {'round':>5} {'round s':>8} {'train s':>8} {'overhead s':>10}"
                    f" = {'startup s':>9} + {'in hlora s':>10} + {'flower s':>8}"
                )
                for r in rounds:
                    split = (
                        f" = {r['startup_s']:>9.2f} + {r['hlora_s']:>10.2f} + {r['flower_s']:>8.2f}"
                        if "startup_s" in r
                        else ""
                    )
                    print(
                        f"{'':<{len(setting) + 1}} {r['round']:>5} {r['round_s']:>8.2f} "
                        f"{r['train_s']:>8.2f} {r['overhead_s']:>10.2f}{split}"
                    )
                mean = sum(r["overhead_s"] for r in rounds) / len(rounds)
                summary[setting] = {"rounds": rounds, "mean_overhead_s": mean}
            out["deployment"] = summary
            if len(summary) == 2:
                before = summary["before"]["mean_overhead_s"]
                after = summary["after"]["mean_overhead_s"]
                out["ratio"] = before / after
                print(
                    f"mean overhead per round: before {before:.2f} s, after {after:.2f} s, "
                    f"ratio {before / after:.2f}x"
                )
            else:
                for name, r in summary.items():
                    print(f"mean overhead per round, {name}: {r['mean_overhead_s']:.2f} s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The run's configuration as it travels to the nodes, and what a node checks against it.

The server sends a :class:`RunManifest` with its QUERY message and with every TRAIN message
(record ``hlora.run``): the whole hlora configuration, made portable (no path of the server's
machine: ``data.data_dir`` is cleared, a model folder travels as its folder name, ``output`` is
reset), and a fingerprint of what must match on every node: the pretrained weights and the
tokenizer (a SHA-256 over the loaded backbone, :func:`backbone_sha256`), the task, the target
modules, the LoRA scaling and the ranks.

A node trains with the server's configuration, filling in only its own paths
(:func:`node_run_config`): ``data-dir`` and ``model-dir`` from its ``--node-config``, else those
of a local copy of the hlora configuration (simulation, or a node on the server's machine). A
node whose model or data cannot match refuses in one line (the QUERY answer's ``refused``
key), and the server drops it with that reason.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from hlora.config import OutputConfig, RunConfig, config_from_dict, fingerprint, replace, to_toml
from hlora.engines.flower.codec import RUN, CodecError
from hlora.errors import ConfigError, HloraError
from hlora.models import Backbone
from hlora.stack import load_run_backbone

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def backbone_sha256(backbone: Backbone) -> str:
    """SHA-256 of a freshly loaded backbone: every tensor of its state dict and its tokenizer.

    Tensors are hashed by name (sorted), dtype, shape and raw bytes; the tokenizer by its
    vocabulary (sorted token -> id pairs). The seeded head is part of the state dict, so two
    nodes that would start from different heads differ too.

    Args:
        backbone: A backbone as :func:`hlora.models.load_backbone` returns it, before LoRA
            adapters are added.
    """
    digest = hashlib.sha256()
    state = backbone.model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    vocab = backbone.tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items())).encode())
    return digest.hexdigest()


def model_sha256(config: RunConfig) -> str:
    """:func:`backbone_sha256` of the run's model, loaded as every node loads it."""
    return backbone_sha256(load_run_backbone(config))


def _is_folder(name: str) -> bool:
    return Path(name).expanduser().exists()


def portable_config(config: RunConfig) -> tuple[RunConfig, bool]:
    """``config`` without the paths of this machine.

    Returns:
        The portable configuration (``data.data_dir`` cleared, ``output`` at its defaults, a
        model folder replaced by its folder name) and whether the model is a folder.
    """
    folder = _is_folder(config.model.name)
    name = Path(config.model.name).expanduser().resolve().name if folder else config.model.name
    portable = replace(config, data={"data_dir": ""}, model={"name": name})
    defaults = OutputConfig()
    portable = replace(portable, output={"dir": defaults.dir, "name": defaults.name})
    return portable, folder


@dataclass(frozen=True)
class RunManifest:
    """What the server sends every node about the run.

    Attributes:
        config: The portable run configuration (see :func:`portable_config`).
        model_sha256: :func:`backbone_sha256` of the server's model.
        model_is_folder: The model is a folder on the server (a node needs its own copy).
        fingerprint: :func:`hlora.federation.fingerprint` of ``config``.
    """

    config: RunConfig
    model_sha256: str
    model_is_folder: bool
    fingerprint: str

    @staticmethod
    def of(config: RunConfig, model_sha: str) -> RunManifest:
        """The manifest of ``config`` whose model has SHA-256 ``model_sha``."""
        portable, folder = portable_config(config)
        return RunManifest(portable, model_sha, folder, fingerprint(portable))

    def summary(self) -> dict[str, Any]:
        """What must match on every node, in words (for messages and logs)."""
        m = self.config.model
        return {
            "model": m.name,
            "model-sha256": self.model_sha256,
            "task": self.config.data.task,
            "target-modules": list(m.target_modules),
            "scaling": m.lora_scaling,
            "ranks": list(self.config.federation.ranks),
        }

    def to_record(self) -> ConfigRecord:
        """The manifest as the ``hlora.run`` record."""
        return ConfigRecord(
            {
                "config": to_toml(self.config),
                "model-sha256": self.model_sha256,
                "model-is-folder": self.model_is_folder,
                "fingerprint": self.fingerprint,
                "model": self.config.model.name,
                "task": self.config.data.task,
                "target-modules": list(self.config.model.target_modules),
                "scaling": float(self.config.model.lora_scaling),
                "ranks": [int(r) for r in self.config.federation.ranks],
            }
        )

    @staticmethod
    def from_content(content: RecordDict) -> RunManifest | None:
        """The manifest a message carries (None: the message has no ``hlora.run`` record).

        Raises:
            CodecError: A malformed record, or one whose fingerprint does not match its
                configuration.
        """
        if RUN not in content:
            return None
        record = content[RUN]
        if not isinstance(record, ConfigRecord):
            raise CodecError(f"record {RUN!r} is a {type(record).__name__}, not a ConfigRecord")
        try:
            text, sha = str(record["config"]), str(record["model-sha256"])
            folder, stated = bool(record["model-is-folder"]), str(record["fingerprint"])
            config = config_from_dict(tomllib.loads(text))
        except (KeyError, tomllib.TOMLDecodeError, ConfigError) as err:
            raise CodecError(f"malformed {RUN!r} record: {err}") from err
        manifest = RunManifest(config, sha, folder, fingerprint(config))
        if manifest.fingerprint != stated:
            raise CodecError(
                f"the run configuration's fingerprint is {manifest.fingerprint}, the server "
                f"stated {stated}"
            )
        return manifest


def node_run_config(
    manifest: RunManifest, local: RunConfig | None, node: Mapping[str, Any]
) -> RunConfig:
    """The configuration this node trains with: the server's, with this node's own paths.

    Args:
        manifest: What the server sent.
        local: This node's own copy of the hlora configuration, if it has one (its paths are
            used when the node config names none).
        node: The node's ``context.node_config`` (``data-dir``, ``model-dir``).

    Raises:
        HloraError: The run's model is a folder on the server and this node names no copy.
    """
    config = manifest.config
    data_dir = str(node.get("data-dir") or (local.data.data_dir if local else ""))
    model = str(node.get("model-dir") or "")
    if not model and manifest.model_is_folder:
        if local is None:
            raise HloraError(
                f"the run's model is a folder on the server ('{config.model.name}', weights "
                f"sha256 {manifest.model_sha256[:16]}): give this node its copy with "
                "--node-config model-dir=PATH"
            )
        model = local.model.name
    return replace(config, data={"data_dir": data_dir}, model={"name": model or config.model.name})


def check_model(manifest: RunManifest, config: RunConfig, mine: str) -> None:
    """Refuse a node whose model is not the run's.

    Args:
        manifest: What the server sent.
        config: This node's configuration (:func:`node_run_config`).
        mine: :func:`backbone_sha256` of this node's model.

    Raises:
        HloraError: One line naming both models and their hashes.
    """
    if mine != manifest.model_sha256:
        raise HloraError(
            f"this node's model '{config.model.name}' (weights sha256 {mine[:16]}) is not the "
            f"run's '{manifest.config.model.name}' (sha256 {manifest.model_sha256[:16]})"
        )

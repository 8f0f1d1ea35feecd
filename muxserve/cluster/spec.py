"""What the cluster runs: the placement's meshes (``placement.json`` of
``python -m muxserve.muxsched.placement``), each with its model_config, checked before anything starts.

From ``placement.json`` the cluster reads, per entry of ``meshes``: ``mesh`` (its number), ``node``
(meshes of one placement node share a machine), ``num_gpus``, ``llms`` and ``config`` (the mesh's
model_config, relative to the placement folder). Everything else in the file is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import yaml

from muxserve import files
from muxserve.config import MuxServeConfig, load_config
from muxserve.errors import ClusterError, ConfigError


class _PlacementMesh(msgspec.Struct):
    mesh: int
    node: Annotated[int, msgspec.Meta(ge=0)]
    num_gpus: Annotated[int, msgspec.Meta(ge=1)]
    config: str
    llms: Annotated[list[str], msgspec.Meta(min_length=1)]


class _PlacementFile(msgspec.Struct):
    meshes: Annotated[list[_PlacementMesh], msgspec.Meta(min_length=1)]


@dataclass(frozen=True)
class MeshSpec:
    """One mesh of the placement: one instance on ``num_gpus`` GPUs of one machine."""

    index: int  # the placement's mesh number
    node: int  # the placement's node; meshes of one node are kept on one machine
    num_gpus: int
    llms: tuple[str, ...]
    config_path: Path
    config: MuxServeConfig

    @property
    def name(self) -> str:
        return f"mesh{self.index}"

    def models(self) -> dict[str, str]:
        """LLM name -> the config's ``model`` (the ``root`` that /v1/models shows)."""
        return {m.name: m.model for m in self.config.models}


@dataclass(frozen=True)
class ClusterSpec:
    source: Path  # the placement.json read
    meshes: tuple[MeshSpec, ...]

    def mesh_of(self, llm: str) -> MeshSpec:
        for mesh in self.meshes:
            if llm in mesh.llms:
                return mesh
        raise KeyError(llm)

    @property
    def llms(self) -> list[str]:
        return [llm for mesh in self.meshes for llm in mesh.llms]

    @property
    def num_gpus(self) -> int:
        return sum(m.num_gpus for m in self.meshes)

    def nodes(self) -> dict[int, list[MeshSpec]]:
        """The placement's nodes and their meshes, in node order."""
        out: dict[int, list[MeshSpec]] = {}
        for mesh in self.meshes:
            out.setdefault(mesh.node, []).append(mesh)
        return dict(sorted(out.items()))


def placement_file(path: str | Path) -> Path:
    """``placement.json`` itself, or the folder that holds it."""
    p = Path(path)
    if p.is_dir():
        if not (p / "placement.json").is_file():
            raise ClusterError(f"placement folder {p} has no placement.json (write it with "
                               f"python -m muxserve.muxsched.placement --output-dir {p})")
        return p / "placement.json"
    if not p.is_file():
        raise ClusterError(f"placement {p} does not exist (give the placement's output folder or its placement.json)")
    return p


def load_placement(path: str | Path) -> ClusterSpec:
    """Read and check a placement; every problem is a ClusterError naming the file and the value."""
    file = placement_file(path)
    raw = files.load(file, "placement", _PlacementFile, ClusterError, source=str(file))
    meshes, owner = [], {}
    for i, m in enumerate(raw.meshes):
        where = f"{file}: meshes[{i}] (mesh {m.mesh})"
        config_path = Path(m.config) if Path(m.config).is_absolute() else file.parent / m.config
        try:
            config = load_config(config_path)
        except ConfigError as e:
            raise ClusterError(f"{where}: config {m.config!r}: {e}") from None
        if sorted(config.model_names) != sorted(m.llms):
            raise ClusterError(f"{where}: placement.json lists LLMs {m.llms} but its config {config_path} "
                               f"serves {config.model_names}")
        if config.num_gpus != m.num_gpus:
            raise ClusterError(f"{where}: num_gpus {m.num_gpus} but its config {config_path} has "
                               f"num_gpus {config.num_gpus}")
        if any(x.index == m.mesh for x in meshes):
            raise ClusterError(f"{where}: mesh number {m.mesh} appears twice")
        for llm in m.llms:
            if llm in owner:
                raise ClusterError(f"{where}: LLM {llm!r} is also on mesh {owner[llm]}; an LLM runs on one mesh")
            owner[llm] = m.mesh
        meshes.append(MeshSpec(m.mesh, m.node, m.num_gpus, tuple(m.llms), config_path.resolve(), config))
    return ClusterSpec(file.resolve(), tuple(meshes))


def portable_config(mesh: MeshSpec, base: Path) -> str:
    """The mesh's model_config as YAML text to be written on the node that runs it.

    Model paths relative to ``base`` (where the command runs, as for the launcher) that exist
    here become absolute: the node must see them at the same place (a shared or copied folder).
    The workload file is dropped: the cluster hands each instance its own requests.
    """
    doc = yaml.safe_load(mesh.config_path.read_text())
    for entry in doc.get("models", []):
        model = Path(str(entry["model"]))
        if not model.is_absolute() and (base / model).exists():
            entry["model"] = str((base / model).resolve())
    doc.pop("workloads", None)
    return yaml.safe_dump(doc, sort_keys=False)

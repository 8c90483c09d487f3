"""The planner: a Project and a target become a DAG of steps.

For a package target::

    model:ridge ──┐
                  ├─▶ context:diabetes ──▶ package:bundle/diabetes
    model:lasso ──┘

For a process target, a ``venv`` per environment and a ``process`` per service::

    model:ridge ──▶ context:diabetes ──┐
                                       ├─▶ process:dev/diabetes
    venv:sklearn ──────────────────────┘

For a docker target, an ``image`` per service, a ``push`` when the project names a
registry, and a ``container`` per service::

    model:ridge ──▶ context:diabetes ──▶ image:diabetes ──▶ push:diabetes ──▶ container:local/diabetes

For a kubernetes target, the image pushed to the project's registry (the cluster pulls
it by digest) and a ``k8s`` step per service::

    model:ridge ──▶ context:diabetes ──▶ image:diabetes ──▶ push:diabetes ──▶ k8s:staging/diabetes

(``lock:ENV`` comes before ``context`` and ``venv``.)

The graph is a ``networkx.DiGraph``. Importing networkx costs more than a whole
no-op run may take, so the planned steps (topologically sorted) are cached in the
state database under a key of the manifest's digest, the target and the planner's
version: a no-op run never imports networkx.
"""

from __future__ import annotations

from mlbuild import __version__
from mlbuild.errors import InvalidInput
from mlbuild.graph.step import StepSpec
from mlbuild.manifest.model import Project, Target
from mlbuild.state.digest import hash_json

PLANNER_VERSION = 7


def _model_step_id(ref) -> str:
    return f"model:{ref}"


def build_graph(project: Project, target: Target):
    """The step DAG for deploying ``target``. Nodes carry a ``spec`` attribute.

    Raises:
        InvalidInput: a kubernetes target in a project without a registry.
    """
    import networkx as nx

    if target.type == "kubernetes" and not project.registry:
        raise InvalidInput(
            f"{project.manifest_path.name}:{target.line or 1}: targets.{target.name}: a "
            "kubernetes target needs the project's registry: the cluster pulls the images "
            "from it",
            hint="add registry: HOST[:PORT]/PATH at the top of the manifest")
    g = nx.DiGraph()

    def add(spec: StepSpec) -> None:
        if spec.id not in g:
            g.add_node(spec.id, spec=spec)
        for dep in spec.deps:
            g.add_edge(dep, spec.id)

    for service in project.services_for(target):
        model_ids = []
        for ref in service.models:
            sid = _model_step_id(ref)
            add(StepSpec(sid, "model", {"model": ref.name, "version": ref.version}))
            model_ids.append(sid)
        ctx_id = f"context:{service.name}"
        lock_id = f"lock:{service.environment}"
        add(StepSpec(lock_id, "lock", {"environment": service.environment}))
        env_deps = [lock_id]
        if target.type in ("package", "docker") and target.offline:
            # Its own context: the same files plus every wheel, installed with --no-index.
            wheels_id = f"wheels:{service.environment}"
            add(StepSpec(wheels_id, "wheels", {"environment": service.environment}, env_deps))
            ctx_id = f"context:{service.name}+offline"
            add(StepSpec(ctx_id, "context", {"service": service.name, "offline": True},
                         model_ids + env_deps + [wheels_id]))
        else:
            add(StepSpec(ctx_id, "context", {"service": service.name}, model_ids + env_deps))
        if target.type == "package":
            add(StepSpec(f"package:{target.name}/{service.name}", "package",
                         {"service": service.name, "target": target.name}, [ctx_id]))
        elif target.type == "docker":
            image_id = f"image:{service.name}"
            add(StepSpec(image_id, "image", {"service": service.name}, [ctx_id]))
            last = image_id
            if project.registry:
                last = f"push:{service.name}"
                add(StepSpec(last, "push", {"service": service.name}, [image_id]))
            add(StepSpec(f"container:{target.name}/{service.name}", "container",
                         {"service": service.name, "target": target.name},
                         sorted({ctx_id, image_id, last})))
        elif target.type == "kubernetes":
            image_id = f"image:{service.name}"
            push_id = f"push:{service.name}"
            add(StepSpec(image_id, "image", {"service": service.name}, [ctx_id]))
            add(StepSpec(push_id, "push", {"service": service.name}, [image_id]))
            add(StepSpec(f"k8s:{target.name}/{service.name}", "k8s",
                         {"service": service.name, "target": target.name}, [push_id]))
        elif target.type == "process":
            venv_id = f"venv:{service.environment}"
            add(StepSpec(venv_id, "venv", {"environment": service.environment}, env_deps))
            add(StepSpec(f"process:{target.name}/{service.name}", "process",
                         {"service": service.name, "target": target.name}, [ctx_id, venv_id]))
    assert nx.is_directed_acyclic_graph(g)
    return g


def plan_key(project: Project, target: Target) -> str:
    return hash_json([project.manifest_digest, target.name, target.offline, __version__,
                      PLANNER_VERSION])


def plan_steps(project: Project, target: Target, db=None) -> list[StepSpec]:
    """The steps of ``target`` in a deterministic topological order (cached in ``db``)."""
    key = plan_key(project, target)
    if db is not None:
        cached = db.get_plan(key)
        if cached is not None:
            return [StepSpec.from_json(d) for d in cached]
    import networkx as nx

    g = build_graph(project, target)
    order = list(nx.lexicographical_topological_sort(g))
    specs = [g.nodes[n]["spec"] for n in order]
    if db is not None:
        db.put_plan(key, [s.to_json() for s in specs])
    return specs


def service_steps(project: Project, service: str) -> list[StepSpec]:
    """The steps that build one service's context (what ``mlbuild serve`` needs)."""
    svc = project.services[service]
    specs = [StepSpec(_model_step_id(ref), "model", {"model": ref.name, "version": ref.version})
             for ref in svc.models]
    specs.append(StepSpec(f"lock:{svc.environment}", "lock", {"environment": svc.environment}))
    specs.append(StepSpec(f"context:{service}", "context", {"service": service},
                          [s.id for s in specs]))
    return specs


def image_tar_steps(project: Project, target: Target) -> list[StepSpec]:
    """What ``deploy PACKAGE-TARGET --image-tar`` adds: each service's image, saved."""
    out = []
    for service in project.services_for(target):
        image_id = f"image:{service.name}"
        out.append(StepSpec(image_id, "image", {"service": service.name},
                            [f"context:{service.name}"]))
        out.append(StepSpec(f"imagetar:{target.name}/{service.name}", "imagetar",
                            {"service": service.name, "target": target.name}, [image_id]))
    return out


def select(specs: list[StepSpec], kinds: set[str]) -> list[StepSpec]:
    """The steps of the given kinds and everything they depend on."""
    return closure(specs, {s.id for s in specs if s.kind in kinds})


def closure(specs: list[StepSpec], ids: set[str]) -> list[StepSpec]:
    """The steps ``ids`` and everything they depend on, in plan order."""
    by_id = {s.id: s for s in specs}
    keep: set[str] = set()
    stack = [i for i in ids if i in by_id]
    while stack:
        sid = stack.pop()
        if sid not in keep:
            keep.add(sid)
            stack.extend(by_id[sid].deps)
    return [s for s in specs if s.id in keep]


def render_graph(specs: list[StepSpec], fmt: str) -> str:
    """The plan as text, Graphviz dot or Mermaid."""
    if fmt == "text":
        lines = []
        for s in specs:
            deps = f"  <- {', '.join(s.deps)}" if s.deps else ""
            lines.append(f"{s.id}{deps}")
        return "\n".join(lines)
    if fmt == "dot":
        import networkx as nx

        g = nx.DiGraph()
        for s in specs:
            g.add_node(s.id)
            for d in s.deps:
                g.add_edge(d, s.id)
        out = ["digraph mlbuild {", "  rankdir=LR;", '  node [shape=box, fontname="sans-serif"];']
        for n in g.nodes:
            out.append(f'  "{n}";')
        for a, b in g.edges:
            out.append(f'  "{a}" -> "{b}";')
        out.append("}")
        return "\n".join(out)
    if fmt == "mermaid":
        ids = {s.id: f"s{i}" for i, s in enumerate(specs)}
        out = ["graph LR"]
        for s in specs:
            out.append(f'  {ids[s.id]}["{s.id}"]')
        for s in specs:
            for d in s.deps:
                out.append(f"  {ids[d]} --> {ids[s.id]}")
        return "\n".join(out)
    raise ValueError(fmt)

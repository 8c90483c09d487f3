"""The command line: parse, call ``mlbuild.api``, print. Nothing else lives here.

``main`` is the one place that turns errors into exit codes (see mlbuild.errors).
"""

from __future__ import annotations

import json
import signal
import sys
import time

import click

from mlbuild import __version__
from mlbuild.errors import (EXIT_BROKEN, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK,
                            MlbuildError)


class Obj:
    def __init__(self, directory: str, file: str | None, verbose: bool, as_json: bool):
        self.directory = directory
        self.file = file
        self.verbose = verbose
        self.json = as_json

    @property
    def where(self) -> dict:
        return {"directory": self.directory, "file": self.file}


pass_obj = click.make_pass_decorator(Obj)


def _need_terminal(flag: str) -> None:
    """A question needs someone to answer it: without a terminal, ask for the flag."""
    if not sys.stdin.isatty():
        from mlbuild.errors import InvalidInput

        raise InvalidInput("this would ask for confirmation, but there is no terminal",
                           hint=f"pass {flag} to confirm")


# --json as click parsed it, and whether a command already printed its JSON: an error
# after that (e.g. invoke's non-2xx answer) must not print a second document.
_JSON = {"on": None, "written": False}
_JSON_HELP = "Print one JSON document on stdout (an error too)."


def _emit_json(data) -> None:
    _JSON["written"] = True
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _json_after_the_verb(ctx: click.Context, param, value: bool) -> None:
    if value:
        obj = ctx.find_object(Obj)
        if obj is not None:  # None only while click completes a command line
            obj.json = True
        _JSON["on"] = True


class _Group(click.Group):
    """A group whose every command (and subgroup) also takes ``--json`` after its name
    (``mlbuild status --json``), the same flag as ``mlbuild --json status``.

    NOTE: added here rather than by a decorator on each command, so a command added
    later cannot forget it (tests/func/test_cli_json.py runs every command both ways).
    """

    group_class = type  # subgroups (`models`) are _Groups too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "json_after_verb" for p in cmd.params):
            cmd.params.append(click.Option(["--json", "json_after_verb"], is_flag=True,
                                           expose_value=False, callback=_json_after_the_verb,
                                           help=_JSON_HELP))
        super().add_command(cmd, name)


@click.group(cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-C", "directory", default=".", metavar="DIR", show_default=True,
              help="Run as if started in DIR.")
@click.option("-f", "--file", "file", default=None, metavar="FILE",
              help="Manifest file (default: mlproject.yaml in DIR).")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and more detail.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.version_option(__version__, prog_name="mlbuild")
@click.pass_context
def cli(ctx: click.Context, directory, file, verbose, as_json):
    """mlbuild: build and deploy ML model services from mlproject.yaml,
    doing only the work whose inputs changed.

    --json, before or after a command's name, makes stdout one JSON document: the
    result, or {"error": ...}. Not with logs -f (a stream) or serve (a server)."""
    ctx.obj = Obj(directory, file, verbose, as_json)
    _JSON["on"] = as_json


# -- init / validate ----------------------------------------------------------------------

@cli.command()
@click.option("--name", help="Project name (default: the folder's name).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@pass_obj
def init(o: Obj, name, force):
    """Scaffold a project that deploys as is."""
    from mlbuild import api

    written = api.init(o.directory, name, force)
    if o.json:
        return _emit_json({"written": written})
    for f in written:
        click.echo(f"wrote {f}")
    click.echo("next: mlbuild deploy")


@cli.command()
@pass_obj
def validate(o: Obj):
    """Check the manifest; report every problem at once."""
    from mlbuild import api

    p = api.validate(**o.where)
    if o.json:
        return _emit_json({"valid": True, "project": p.name, "models": list(p.models),
                           "environments": list(p.environments), "services": list(p.services),
                           "targets": list(p.targets), "default_target": p.default_target})
    defaults = [e.name for e in p.environments.values() if e.default_for]
    envs = f"{len(p.environments)} environments"
    if defaults:
        envs += f" (no-code defaults: {', '.join(defaults)})"
    click.echo(f"{p.manifest_path.name}: valid — project {p.name}: {len(p.models)} models, "
               f"{envs}, {len(p.services)} services, "
               f"{len(p.targets)} targets (default: {p.default_target})")


# -- plan / graph / build / deploy ---------------------------------------------------------

_LABEL = {"up-to-date": "up to date", "would-run": "will run", "ran": "ran",
          "failed": "FAILED", "not-run": "not run"}


@cli.command()
@click.argument("target", required=False)
@pass_obj
def plan(o: Obj, target):
    """Show what deploy TARGET would do, and why each step would run."""
    from mlbuild import api

    r = api.plan(target=target, **o.where)
    if o.json:
        return _emit_json({"target": r.target.name, "steps": [x.to_json() for x in r.outcomes]})
    todo = r.count("would-run")
    click.echo(f"target {r.target.name} ({r.target.type}): {len(r.outcomes)} steps, "
               f"{todo} to run")
    width = max((len(x.id) for x in r.outcomes), default=0)
    for x in r.outcomes:
        why = f"  ({'; '.join(x.reasons)})" if x.reasons else ""
        click.echo(f"  {_LABEL[x.status]:<10}  {x.id:<{width}}{why}".rstrip())


@cli.command()
@click.argument("target", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "dot", "mermaid"]), default="text",
              show_default=True)
@pass_obj
def graph(o: Obj, target, fmt):
    """Print the step graph of TARGET (with --json: its steps and their dependencies,
    whatever --format says)."""
    from mlbuild import api

    text = api.graph(target=target, fmt="text" if o.json else fmt, **o.where)
    if o.json:
        name = target or api.validate(**o.where).default_target
        return _emit_json({"target": name, "steps": _graph_steps(text)})
    click.echo(text)


def _graph_steps(text: str) -> list[dict]:
    """The text form of the graph, one ``ID  <- DEP, DEP`` a line, as data.

    NOTE: read back from api.graph's text form (planner.render_graph) because api
    returns only rendered forms; step ids hold no spaces or commas (the manifest's name
    patterns), so this is exact. If api.graph grows a structured form, use that.
    """
    steps = []
    for line in text.splitlines():
        sid, _, deps = line.partition("  <- ")
        steps.append({"id": sid, "kind": sid.split(":", 1)[0],
                      "deps": deps.split(", ") if deps else []})
    return steps


class Reporter:
    """Prints steps as they are decided and run."""

    def __init__(self, o: Obj):
        self.o = o

    def __call__(self, event: str, x) -> None:
        if self.o.json:
            return
        if event == "start":
            why = "; ".join(x.reasons)
            click.echo(f"  run         {x.id}  ({why})", err=True)
            return
        if x.status == "up-to-date":
            if self.o.verbose:
                click.echo(f"  up to date  {x.id}", err=True)
        elif x.status == "ran":
            click.echo(f"  done        {x.id}  {x.summary} [{x.duration:.2f} s]", err=True)
        elif x.status == "failed":
            # The whole message (with log lines) follows as the error itself.
            click.echo(f"  FAILED      {x.id}", err=True)


def _run_verb(o: Obj, verb: str, target, force: bool, **extra):
    from mlbuild import api, progress

    started = time.monotonic()
    fn = {"deploy": api.deploy, "build": api.build, "push": api.push}[verb]
    # Builds, pushes and pulls show their progress on stderr (a live line on a
    # terminal, plain lines at a bounded rate otherwise); with --json, none: stderr
    # stays as quiet as the Reporter keeps it.
    with progress.shown(None if o.json else progress.Display(sys.stderr)):
        r = fn(target=target, on_event=Reporter(o), force=force, **extra, **o.where)
    took = time.monotonic() - started
    if o.json:
        return _emit_json({"target": r.target.name, "seconds": round(took, 3),
                           "steps": [x.to_json() for x in r.outcomes]})
    ran, fresh = r.count("ran"), r.count("up-to-date")
    if ran == 0:
        click.echo(f"{verb} {r.target.name}: up to date ({fresh} steps checked, {took:.2f} s)")
    else:
        click.echo(f"{verb} {r.target.name}: {ran} steps ran, {fresh} up to date ({took:.2f} s)")
    for x in r.outcomes:
        if x.kind == "package" and x.outputs:
            click.echo(f"  package: {x.outputs['dir']}")
        elif x.kind == "imagetar" and x.outputs:
            click.echo(f"  image:   {x.outputs['file']}  (docker load -i {x.outputs['file']})")
        elif x.kind in ("process", "container") and x.outputs:
            service = x.id.split("/", 1)[1]
            click.echo(f"  {service}: {x.outputs['url']}  (mlbuild invoke {service} "
                       f"-t {r.target.name} --data @FILE)")
        elif x.kind == "k8s" and x.outputs:
            service = x.id.split("/", 1)[1]
            where = x.outputs.get("url") or (
                f"{x.outputs['namespace']}/{x.outputs['deployment']}" if x.outputs["applied"]
                else f"{len(x.outputs['files'])} files in {r.target.kube.out}/ (apply: false)")
            click.echo(f"  {service}: {where}")


@cli.command()
@click.argument("target", required=False)
@click.option("--force", is_flag=True, help="Run every step, even those up to date.")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Build up to N images at once.")
@click.option("--frozen", is_flag=True,
              help="Never write lock files: fail when one does not match its spec (CI).")
@pass_obj
def build(o: Obj, target, force, jobs, frozen):
    """Build what TARGET needs (models, build contexts, images) without deploying."""
    _run_verb(o, "build", target, force, jobs=jobs, frozen=frozen)


@cli.command()
@click.argument("target", required=False)
@click.option("--force", is_flag=True, help="Run every step, even those up to date.")
@click.option("--image-tar", is_flag=True,
              help="Package targets: also build each image and save it as OUT/SERVICE.image.tar.")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Build up to N images at once.")
@click.option("--frozen", is_flag=True,
              help="Never write lock files: fail when one does not match its spec (CI).")
@click.option("--offline", is_flag=True,
              help="Package and docker targets: include every wheel (and conda package), so "
                   "the image builds without network.")
@click.option("--force-conflicts", is_flag=True,
              help="Kubernetes targets: take over fields another field manager owns.")
@pass_obj
def deploy(o: Obj, target, force, image_tar, jobs, frozen, offline, force_conflicts):
    """Bring TARGET (default: default_target) up to date."""
    _run_verb(o, "deploy", target, force, image_tar=image_tar, jobs=jobs, frozen=frozen,
              offline=offline, force_conflicts=force_conflicts)


@cli.command()
@click.argument("environment", required=False)
@click.option("--upgrade", is_flag=True,
              help="Move every package to the newest version the spec allows.")
@pass_obj
def lock(o: Obj, environment, upgrade):
    """Lock pip environments (or ENVIRONMENT) into lock files with hashes, beside their
    specs. deploy does this by itself when a spec changed; commit the lock files."""
    from mlbuild import api

    outcomes = api.lock(environment=environment, upgrade=upgrade, on_event=Reporter(o),
                        **o.where)
    if o.json:
        return _emit_json([x.to_json() for x in outcomes])
    for x in outcomes:
        click.echo(f"{x.id}: {x.summary}")


@cli.command()
@click.argument("target", required=False)
@click.option("--force", is_flag=True, help="Run every step, even those up to date.")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Build up to N images at once.")
@pass_obj
def push(o: Obj, target, force, jobs):
    """Build the images of a docker TARGET and push them to the registry."""
    _run_verb(o, "push", target, force, jobs=jobs)


@cli.command()
@click.option("--packages", is_flag=True, help="Also remove package target directories.")
@click.option("--all", "everything", is_flag=True,
              help="Remove all of .mlbuild, the model registry included.")
@click.option("--yes", is_flag=True, help="Do not ask before --all.")
@click.option("--images", is_flag=True,
              help="Only remove the project's Docker images, but the newest --keep per service.")
@click.option("--keep", type=click.IntRange(0), default=2, show_default=True,
              help="Images kept per service with --images.")
@pass_obj
def clean(o: Obj, packages, everything, yes, images, keep):
    """Remove build contexts and step records (the next deploy redoes every step)."""
    from mlbuild import api

    if images:
        removed = api.clean_images(keep=keep, **o.where)
        if o.json:
            return _emit_json({"removed": removed})
        click.echo("removed " + ", ".join(removed) if removed else "nothing to remove")
        return

    if everything and not yes:
        _need_terminal("--yes")
        click.confirm("Remove .mlbuild, including every registered model version?",
                      abort=True, err=o.json)  # with --json, stdout holds only the document
    result = api.clean(packages=packages, everything=everything, **o.where)
    if o.json:
        return _emit_json(result)
    removed = result["removed"]
    click.echo("removed " + ", ".join(removed) if removed else "nothing to remove")
    for k in result["kept"]:
        click.echo(f"kept {k['path']}: {k['why']}")


# -- running services ------------------------------------------------------------------------

def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    sec = max(0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if sec >= n:
            return f"{int(sec // n)}{unit} ago"
    return f"{int(sec)}s ago"


@cli.command()
@click.argument("target", required=False)
@pass_obj
def status(o: Obj, target):
    """State of the deployed services (default: of every process, docker and kubernetes
    target).

    States: Healthy, Transitioning (init() running), Unhealthy (running, failing its
    health check), Failed (exited or crash-looping; with its exit status and the last
    lines of its log), Unknown (its cluster cannot be asked), - (not deployed). A
    running service also shows its last minute of /score from its /metrics: requests,
    errors (5xx) and the 99th percentile of their time (with --json: "traffic",
    {"window_seconds", "requests", "errors", "client_errors", "p99_ms"}, or null when
    nothing answered). On kubernetes: of its ready pods (at most 10), each read through
    the API server's pod proxy (RBAC: get pods/proxy) and added up, the p99 being the
    largest pod's (an upper bound). A service that collects model data says where the
    records go (--json: "model_data", else null)."""
    from mlbuild import api

    rows = api.status(target=target, **o.where)
    if o.json:
        return _emit_json([r.to_json() for r in rows])
    if not rows:
        click.echo("no process, docker or kubernetes targets")
        return
    table = [("TARGET", "SERVICE", "STATE", "URL", "PID/IMAGE", "FINGERPRINT", "SINCE",
              "LAST MINUTE (/score)", "DETAIL")]
    table += [(r.target, r.service, r.state, r.url or "-", str(r.pid or r.image or "-"),
               r.fingerprint or "-", _ago(r.since),
               r.traffic.summary() if r.traffic is not None else "-", r.detail) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row, r in zip(table, [None, *rows]):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if r is not None and r.model_data:  # collect_model_data (--json: "model_data")
            click.echo(f"    model data: {r.model_data}")
        if r is not None and r.last_lines:
            click.echo(f"    last lines of its log (mlbuild logs {r.service} -t {r.target}):")
            for line in r.last_lines:
                click.echo("      " + line)


@cli.command()
@click.argument("service")
@click.option("-t", "--target", help="Process or docker target (default: default_target).")
@click.option("-n", "--tail", "lines", type=int, default=200, show_default=True,
              help="Lines to show (0: all).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@pass_obj
def logs(o: Obj, service, target, lines, follow):
    """Print the log of SERVICE on a process or docker target (with --json:
    {"service", "lines"}; not with -f, whose output never ends)."""
    from mlbuild import api
    from mlbuild.errors import InvalidInput

    if o.json:
        if follow:
            # NOTE: a followed log is a stream, and --json promises one document; JSON
            # lines would break that promise for one command, so the pair is refused.
            raise InvalidInput("--json with --follow: a followed log is a stream, not one "
                               "JSON document",
                               hint="drop -f to get the last lines as JSON, or drop --json "
                                    "to follow the log")
        found = list(api.logs(service, target=target, lines=lines, **o.where))
        return _emit_json({"service": service, "lines": found})
    found = api.logs(service, target=target, lines=lines, follow=follow, **o.where)
    try:
        if follow:
            _log_pointers(o, service, target)
        for line in found:
            click.echo(line)
        if not follow:
            _log_pointers(o, service, target)
    except KeyboardInterrupt:
        return


def _log_pointers(o: Obj, service: str, target: str | None) -> None:
    """On stderr, after the log (before it, followed): where the service's metrics and
    its collected model data are, and what shows its last minute. Best effort: a
    service that is not running, or anything that fails here, prints nothing."""
    from mlbuild import api

    try:
        rows = [r for r in api.status(target=target, **o.where)
                if r.service == service and r.url]
    except Exception:  # noqa: BLE001  a hint only
        return
    if not rows:
        return
    r = rows[0]
    parts = [f"metrics: {r.url}/metrics"]
    if r.model_data:
        parts.append(f"model data: {r.model_data}")
    parts.append(f"last minute: mlbuild status {r.target}")
    click.echo("(" + "; ".join(parts) + ")", err=True)


@cli.command()
@click.argument("target", required=False)
@pass_obj
def down(o: Obj, target):
    """Stop the services of a process or docker TARGET (venvs, images and keys are kept)."""
    from mlbuild import api

    stopped = api.down(target=target, **o.where)
    if o.json:
        return _emit_json({"stopped": stopped})
    click.echo("stopped " + ", ".join(stopped) if stopped else "nothing was running")


@cli.command()
@click.argument("service")
@click.option("-t", "--target",
              help="Process, docker or kubernetes target (default: default_target).")
@click.option("-d", "--data", required=True, metavar="JSON|@FILE|-",
              help="Request body: inline text, @FILE to read a file, - for stdin.")
@click.option("--content-type", default="application/json", show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds.")
@click.option("--url", help="Call this base URL instead of the recorded one (e.g. a "
                            "kubectl port-forward: http://127.0.0.1:8080).")
@pass_obj
def invoke(o: Obj, service, target, data, content_type, timeout, url):
    """Call a deployed SERVICE's /score (with its key) and print the answer."""
    from mlbuild import api
    from mlbuild.errors import InvalidInput, StepFailed

    if data == "-":
        body = sys.stdin.buffer.read()
    elif data.startswith("@"):
        try:
            with open(data[1:], "rb") as fh:
                body = fh.read()
        except OSError as e:
            raise InvalidInput(f"--data {data}: {e.strerror}") from e
    else:
        body = data.encode()
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:  # broken JSON is the caller's to fix, not the service's 500 to answer
            json.loads(body)
        except ValueError as e:
            where = f"--data {data}" if data.startswith("@") or data == "-" else "--data"
            raise InvalidInput(f"{where} is not valid JSON: {e}",
                               hint="fix it, or send it as it is with --content-type "
                                    "text/plain") from None
    r = api.invoke(service, body, target=target, content_type=content_type, timeout=timeout,
                   url=url, **o.where)
    if o.json:
        try:
            parsed = json.loads(r.body)
        except ValueError:
            parsed = r.body.decode("utf-8", "replace")
        _emit_json({"status": r.status, "body": parsed})
    else:
        out = r.body.decode("utf-8", "replace")
        click.echo(out, nl=not out.endswith("\n"))
    if r.status >= 400:
        raise StepFailed(f"invoke:{service}", f"the service answered {r.status}")


def _numbers(kind):
    """A click callback: ``"0.5,1,2"`` -> ``(0.5, 1.0, 2.0)`` (or ints)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of "
                                     f"{'integers' if kind is int else 'numbers'}") from None
    return parse


@cli.command()
@click.argument("service")
@click.option("-t", "--target", help="Docker target whose image is profiled (default: the "
                                     "first docker target, else a local process).")
@click.option("-d", "--data", metavar="FILE",
              help="Request bodies: one per line (Azure's format) or a JSON list "
                   "(default: the service's schema input sample).")
@click.option("--cpus", default="0.5,1,2", show_default=True, callback=_numbers(float),
              help="CPU limits to try.")
@click.option("--memory-gb", default="2", show_default=True, callback=_numbers(float),
              help="Memory limits to try (GB).")
@click.option("--concurrency", default="1,2,4,8,16,32", show_default=True,
              callback=_numbers(int), help="Concurrency steps (connections).")
@click.option("--window", type=float, default=3.0, show_default=True,
              help="Seconds measured per step.")
@click.option("--warmup", type=float, default=2.0, show_default=True,
              help="Seconds of load before the steps, not measured.")
@click.option("--slo-p99-ms", type=float, help="Latency objective: p99 in milliseconds.")
@click.option("--out", metavar="DIR", help="Report folder (default: .mlbuild/profile/SERVICE).")
@click.option("--write", is_flag=True,
              help="Store the recommendation: model version tags and models.NAME.resources "
                   "in the manifest.")
@pass_obj
def profile(o: Obj, service, target, data, cpus, memory_gb, concurrency, window, warmup,
            slo_p99_ms, out, write):
    """Load-test SERVICE at each CPU/memory limit and recommend what it needs.

    Writes profile.json (Azure's keys and every step) and profile.html (plots) to --out."""
    from mlbuild import api, progress
    from mlbuild.profile import report

    shown = None if o.json else progress.Display(sys.stderr)
    current: dict = {}

    def on_step(k, n, label, step):
        if shown is None:
            return
        if current.get("k") != k:
            if current.get("task"):
                current["task"].close()
            current.update(k=k, task=progress.task("profiling", f"{service} [{k}/{n}] "
                                                                f"{label}"))
        current["task"].step(k, n, step)

    def say(msg):
        if not o.json:
            click.echo(msg, err=True)

    with progress.shown(shown):
        try:
            r = api.profile(service, target=target, data=data, cpus=cpus, memory_gb=memory_gb,
                            concurrency=concurrency, window=window, warmup=warmup,
                            slo_p99_ms=slo_p99_ms, out=out, write=write,
                            on_event=Reporter(o), say=say, on_step=on_step, **o.where)
        finally:
            if current.get("task"):
                current["task"].close()
    if o.json:
        return _emit_json(r.doc)
    click.echo(report.table(r.doc))
    click.echo(f"report: {r.out / 'profile.html'}  (data: {r.out / 'profile.json'})")


@cli.command()
@click.argument("service")
@click.option("-t", "--target", help="Target (default: default_target).")
@click.option("--regenerate", type=click.Choice(["primary", "secondary"]),
              help="Make a new key; the next deploy of the target applies it.")
@click.option("--secret", is_flag=True,
              help="Kubernetes targets: print the Secret holding the keys, as YAML (to "
                   "seal or apply yourself with apply: false).")
@pass_obj
def keys(o: Obj, service, target, regenerate, secret):
    """Print the auth keys of SERVICE (auth: key) on a target."""
    from mlbuild import api

    if secret:
        text = api.keys_secret(service, target=target, **o.where)
        if o.json:  # the same Secret, as JSON (kubectl applies either)
            import yaml

            return _emit_json(yaml.safe_load(text))
        click.echo(text, nl=False)
        return
    primary, secondary = api.keys(service, target=target, regenerate=regenerate, **o.where)
    if o.json:
        return _emit_json({"primary": primary, "secondary": secondary})
    click.echo(f"primary:   {primary}\nsecondary: {secondary}")
    if regenerate:
        click.echo(f"the {regenerate} key changed: run mlbuild deploy to apply it", err=True)


# `mlbuild serve SERVICE [--port N] [--host H] [--reload]`; any other command line is
# the runtime's (azmlinfsrv's options: `mlbuild serve --entry_script score.py ...`).
_SERVICE_FLAGS = ("--port", "--host", "--reload")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                               "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_obj
def serve(o: Obj, args):
    """Serve a service from this Python, for quick iteration.

    \b
    mlbuild serve SERVICE [--port 5001] [--host 127.0.0.1] [--reload]
        a service of mlproject.yaml: its models registered, its entry script and source
        used in place; --reload restarts on a change of the script, source, samples,
        models or manifest. Auth is off.
    \b
    mlbuild serve --entry-script score.py [--model-dir DIR] [--port 5001]
                  [--health-port N] [--workers N] [--cors-origins LIST] ...
        one entry script, no manifest: a drop-in for azmlinfsrv (its spellings
        --entry_script, --model_dir, --worker_count, --access_control_allow_origins
        and its environment variables work too). python -m mlbuild.runtime --help
        lists every option.
    """
    import os

    from mlbuild.errors import InvalidInput

    if o.json:
        # NOTE: the server logs to stdout until stopped, so there is no one JSON
        # document to give; refused before anything starts.
        raise InvalidInput("mlbuild serve runs a server (its log on stdout) until stopped: "
                           "it has no JSON result",
                           hint="drop --json; for a service's state as JSON, deploy it and "
                                "run mlbuild status --json")
    args = list(args)
    if args in (["-h"], ["--help"]):  # both forms' options: the runtime's are not click's
        from mlbuild.runtime.__main__ import build_parser

        click.echo(click.get_current_context().get_help())
        click.echo("\nOptions of mlbuild serve SERVICE:\n  --port N     (default 5001)\n"
                   "  --host H     (default 127.0.0.1)\n  --reload     restart on every "
                   "change\n\nOptions of the one-script form (the runtime's):")
        click.echo(build_parser(prog="mlbuild serve").format_help())
        return
    if not args and not (os.environ.get("AZUREML_ENTRY_SCRIPT")
                         or os.environ.get("MLBUILD_ENTRY_SCRIPT")):
        raise InvalidInput("mlbuild serve: nothing to serve",
                           hint="mlbuild serve SERVICE (a service of mlproject.yaml), or "
                                "mlbuild serve --entry-script FILE")
    if not _is_service_command_line(args):
        from mlbuild.runtime.__main__ import main as runtime_main

        sys.exit(runtime_main(args))
    _serve_service(o, args)


def _is_service_command_line(args: list) -> bool:
    """Whether ``args`` name a service of mlproject.yaml (one word that is no option's
    value, and only the service form's options) rather than a runtime command line."""
    words, expect_value = [], False
    for arg in args:
        if expect_value:
            expect_value = False
            continue
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            if name not in _SERVICE_FLAGS:
                return False
            expect_value = name != "--reload" and "=" not in arg
            continue
        words.append(arg)
    return len(words) == 1


def _serve_service(o: Obj, args: list) -> None:
    import argparse

    from mlbuild import api
    from mlbuild.errors import InvalidInput

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise InvalidInput(f"mlbuild serve: {message}",
                               hint="mlbuild serve SERVICE [--port N] [--host H] [--reload], "
                                    "or mlbuild serve --entry-script FILE")

    p = _Parser(prog="mlbuild serve", add_help=False)
    p.add_argument("service")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--reload", action="store_true")
    ns = p.parse_args(args)
    reporter = Reporter(o)

    def prepare():
        return api.prepare_serve(ns.service, host=ns.host, port=ns.port, on_event=reporter,
                                 **o.where)

    dev = prepare()
    click.echo(f"serving {ns.service} on http://{ns.host}:{ns.port} (auth off"
               f"{', reloading on changes' if ns.reload else ''}; Ctrl-C stops)", err=True)
    if not ns.reload:
        import os

        sys.stdout.flush()
        os.chdir(dev.cwd)
        os.execve(dev.argv[0], dev.argv, dev.env)
    from mlbuild.devserver import run_with_reload

    run_with_reload(dev, prepare, lambda msg: click.echo(msg, err=True))


# -- state ------------------------------------------------------------------------------------

@cli.group()
def state():
    """The state database in .mlbuild/: start a new one when it was lost."""


@state.command("reset")
@pass_obj
def state_reset(o: Obj):
    """Start a new state database after .mlbuild/state.db was deleted, emptied or damaged.

    The old file (and its -wal) is moved aside, never deleted. Kept: the model blobs;
    taken back: the keys handed to running services, the model versions the build
    contexts and releases hold (same NAME@VERSION), the process releases still running.
    Refused when the database is sound (mlbuild clean --all removes the whole state)."""
    from mlbuild import api

    r = api.state_reset(**o.where)
    if o.json:
        return _emit_json(r.to_json())
    for m in r.moved:
        click.echo(f"moved aside   {m}")
    click.echo("keys          " + (", ".join(r.keys) or "none found"))
    click.echo("models        " + (", ".join(r.models) or "none found")
               + f"  ({r.blobs} blob{'s' if r.blobs != 1 else ''} kept)")
    click.echo("running       " + (", ".join(r.deployments) or "none found"))
    click.echo("a new state database is in place: the next deploy redoes the steps")


# -- models -----------------------------------------------------------------------------------

@cli.group()
def models():
    """The model registry: register, list, show, download, delete, tag."""


def _kv(pairs, what: str) -> dict:
    from mlbuild.errors import InvalidInput

    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise InvalidInput(f"{what} {p!r} is not KEY=VALUE")
        out[k] = v
    return out


def _print_version(mv) -> None:
    click.echo(f"{mv.ref}  {mv.digest[:19]}  {mv.size} bytes  {len(mv.files)} files")
    for label, val in (("description", mv.description), ("framework", mv.framework),
                       ("framework_version", mv.framework_version), ("source", mv.source)):
        if val:
            click.echo(f"  {label}: {val}")
    if mv.tags:
        click.echo("  tags: " + ", ".join(f"{k}={v}" for k, v in sorted(mv.tags.items())))
    if mv.properties:
        click.echo("  properties: " + ", ".join(f"{k}={v}" for k, v in sorted(mv.properties.items())))
    if mv.resources:
        click.echo("  resources: " + ", ".join(f"{k}={v}" for k, v in mv.resources.items() if v))


@models.command("register")
@click.argument("path")
@click.option("--name", "-n", required=True, help="Model name.")
@click.option("--description", "-d")
@click.option("--tag", "-t", "tags", multiple=True, metavar="KEY=VALUE")
@click.option("--property", "-p", "props", multiple=True, metavar="KEY=VALUE")
@click.option("--framework")
@click.option("--framework-version")
@click.option("--cpu", type=float)
@click.option("--memory-gb", type=float)
@pass_obj
def models_register(o: Obj, path, name, description, tags, props, framework, framework_version,
                    cpu, memory_gb):
    """Register the file or folder PATH as a new version of model NAME."""
    from mlbuild import api

    resources = {"cpu": cpu, "memory_gb": memory_gb} if (cpu or memory_gb) else None
    mv, created = api.models_register(
        path, name, description=description, tags=_kv(tags, "tag"),
        properties=_kv(props, "property"), framework=framework,
        framework_version=framework_version, resources=resources, **o.where)
    if o.json:
        return _emit_json({"created": created, **mv.to_dict()})
    if created:
        click.echo(f"registered {mv.ref} ({mv.size} bytes)")
    else:
        click.echo(f"{mv.ref} already holds this content: no new version")


@models.command("list")
@click.argument("name", required=False)
@pass_obj
def models_list(o: Obj, name):
    """List registered models (every version of NAME)."""
    from mlbuild import api

    versions = api.models_list(name=name, **o.where)
    if o.json:
        return _emit_json([mv.to_dict() for mv in versions])
    if not versions:
        click.echo("no registered models")
        return
    for mv in versions:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(mv.tags.items()))
        click.echo(f"{mv.ref:<24} {mv.size:>12} B  {mv.digest[7:19]}  {tags}")


@models.command("show")
@click.argument("ref", metavar="NAME[@VERSION]")
@pass_obj
def models_show(o: Obj, ref):
    """Show one version (default: the latest)."""
    from mlbuild import api

    mv = api.models_show(ref, **o.where)
    if o.json:
        return _emit_json(mv.to_dict())
    _print_version(mv)
    for p, d, s in mv.files:
        click.echo(f"  {p}  {s} B  {d[7:19]}")


@models.command("download")
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("-o", "--out", help="Folder to write to (default: NAME-VERSION).")
@pass_obj
def models_download(o: Obj, ref, out):
    """Copy a version's files out of the registry."""
    from mlbuild import api

    dest = api.models_download(ref, out, **o.where)
    if o.json:
        return _emit_json({"out": str(dest)})
    click.echo(f"wrote {dest}")


@models.command("delete")
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("--yes", is_flag=True, help="Do not ask before deleting every version.")
@pass_obj
def models_delete(o: Obj, ref, yes):
    """Delete one version, or every version of NAME."""
    from mlbuild import api

    if "@" not in ref and not yes:
        _need_terminal("--yes")
        click.confirm(f"Delete every version of {ref}?", abort=True, err=o.json)
    gone = api.models_delete(ref, **o.where)
    if o.json:
        return _emit_json({"deleted": [mv.ref for mv in gone]})
    click.echo("deleted " + ", ".join(mv.ref for mv in gone))


@models.command("tag")
@click.argument("ref", metavar="NAME[@VERSION]")
@click.argument("tags", nargs=-1, metavar="KEY=VALUE...")
@click.option("--remove", "-r", multiple=True, metavar="KEY", help="Remove a tag.")
@pass_obj
def models_tag(o: Obj, ref, tags, remove):
    """Set or remove tags of a version."""
    from mlbuild import api

    mv = api.models_tag(ref, _kv(tags, "tag"), list(remove), **o.where)
    if o.json:
        return _emit_json(mv.to_dict())
    _print_version(mv)


# -- the one place errors become exit codes --------------------------------------------------

INTERRUPTED = "interrupted: finished steps are recorded; run again to do the rest"


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def _json_wanted(args: list[str]) -> bool:
    """--json was given and nothing was printed as JSON yet. (When click failed before
    it handled --json, e.g. at an unknown option of the command, a --json anywhere on
    the command line counts: before or after the command's name, not after ``--``.)"""
    if _JSON["written"]:
        return False
    if _JSON["on"]:
        return True
    words = args[:args.index("--")] if "--" in args else args
    return "--json" in words


def _json_error(message: str, hint: str | None, code: int, problems=None) -> None:
    """With --json, stdout holds JSON even when the command failed: the error."""
    err: dict = {"message": message, "hint": hint, "exit_code": code}
    if problems is not None:
        err["problems"] = [{"file": p.file, "line": p.line, "path": p.path,
                            "message": p.message} for p in problems]
    try:
        click.echo(json.dumps({"error": err}, indent=2))
    except BrokenPipeError:
        pass


def main(argv=None) -> None:
    """Entry point of the ``mlbuild`` console script and ``python -m mlbuild``."""
    args = list(argv if argv is not None else sys.argv[1:])
    verbose = "-v" in args or "--verbose" in args
    _JSON.update(on=None, written=False)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)  # a closed terminal stops us cleanly too
    try:
        cli.main(args=argv, prog_name="mlbuild", standalone_mode=False)
        code = EXIT_OK
    except click.exceptions.Abort as e:
        # click turns a KeyboardInterrupt inside a command into Abort: say what Ctrl-C
        # (or SIGTERM) left behind, as the KeyboardInterrupt branch below does.
        if isinstance(e.__context__, KeyboardInterrupt):
            click.echo(INTERRUPTED, err=True)
        else:
            click.echo("aborted", err=True)
        code = EXIT_INTERRUPTED
    except click.exceptions.ClickException as e:
        e.show()
        code = EXIT_INVALID
        if _json_wanted(args):
            _json_error(e.format_message(), None, code)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except MlbuildError as e:
        if verbose:
            import traceback

            traceback.print_exc()
        click.echo(f"error: {e.message}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        code = e.exit_code
        if _json_wanted(args):
            _json_error(e.message, e.hint, code, getattr(e, "problems", None))
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = EXIT_OK
    except Exception as e:  # a bug or an unexpected failure of a backend
        if verbose:
            import traceback

            traceback.print_exc()
        click.echo(f"error: mlbuild broke: {type(e).__name__}: {e}", err=True)
        click.echo("hint: run again with --verbose for the traceback, and report it", err=True)
        code = EXIT_BROKEN
        if _json_wanted(args):
            _json_error(f"mlbuild broke: {type(e).__name__}: {e}", None, code)
    sys.exit(code)

"""`streamrec`: one command for the life cycle of the recommender.

Heavy libraries (TensorFlow, Feast, Faiss) are imported inside the commands that need them, so
`--help` and the streaming tools stay fast.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from schemas.artifacts import Artifacts
from schemas.records import EVENT_TYPES  # noqa: E402
from schemas.settings import get_settings  # noqa: E402
from streamrec.stack import SERVICES, EmbeddedStack, StackNotRunning  # noqa: E402
from streamrec.stack.process import StartupError  # noqa: E402

app = typer.Typer(
    help="streamrec: a streaming four-stage recommender on Kafka, Feast, Faiss and Triton.\n\n"
    "Settings come from STREAMREC_* environment variables (see README); services not "
    "configured by URL are started locally by `streamrec stack up`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="Start, inspect and stop the embedded stack (broker, Valkey, Triton).")
topics_app = typer.Typer(help="Manage the Kafka topics.")
produce_app = typer.Typer(
    help="Produce interactions, item updates and requests, encoded and keyed as the workers "
    "read them.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(produce_app, name="produce")

console = Console()
err = Console(stderr=True)


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show the libraries' logs (TensorFlow, Faust, Faiss)."
        ),
    ] = False,
) -> None:
    if verbose:  # for this process and the workers it starts
        os.environ["STREAMREC_LOG_LEVEL"] = "info"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        get_settings.cache_clear()


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _stack() -> EmbeddedStack:
    return EmbeddedStack(get_settings())


def _bootstrap() -> str:
    try:
        return _stack().endpoint("kafka")
    except StackNotRunning as e:
        fail(str(e))
        raise  # unreachable; keeps type checkers happy


# --- stack ----------------------------------------------------------------------------------

ServiceNames = Annotated[
    list[str] | None,
    typer.Argument(help=f"Services to act on (default: all of {', '.join(SERVICES)})."),
]


def _names(services: list[str] | None) -> tuple[str, ...]:
    names = tuple(services or SERVICES)
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        fail(f"unknown service {', '.join(unknown)} (known: {', '.join(SERVICES)})")
    return names


@stack_app.command("up")
def stack_up(services: ServiceNames = None) -> None:
    """Start the embedded services on free 127.0.0.1 ports; they run until `stack down`.

    A service that died is started again on its own port with its data (Valkey's AOF, the
    broker's log, Triton's model repository), so workers and Feast find it where it was."""
    stack = _stack()
    try:
        with console.status("starting") as status:
            stack.up(_names(services), on_start=lambda n: status.update(f"starting {n}"))
    except StartupError as e:
        fail(str(e))
    _print_status(stack)


@stack_app.command("status")
def stack_status() -> None:
    """Show each service: embedded (running/dead/stopped) or external, and its endpoint."""
    _print_status(_stack())


@stack_app.command("down")
def stack_down(services: ServiceNames = None) -> None:
    """Stop the embedded services by PID and remove their leftovers (data stays in run_dir)."""
    from streamrec.workers import Workers

    if Workers(get_settings()).stop_all():
        console.print("stopped the stream workers")
    stopped = _stack().down(_names(services))
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def _print_status(stack: EmbeddedStack) -> None:
    table = Table("service", "state", "endpoint", "pid", title=f"run directory {stack.root}")
    for row in stack.status():
        color = {"running": "green", "external": "cyan", "dead": "red"}.get(row["state"], "dim")
        table.add_row(row["service"], f"[{color}]{row['state']}[/]", row["endpoint"], row["pid"])
    console.print(table)


# --- topics ---------------------------------------------------------------------------------


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic with the configured partition count (existing ones are kept)."""
    from streams.topics import create_topics

    settings = get_settings()
    result = create_topics(settings, _bootstrap())
    table = Table("topic", "result", title=f"{settings.partitions} partitions each")
    for name, state in result.items():
        table.add_row(name, state)
    console.print(table)


@topics_app.command("list")
def topics_list() -> None:
    """List the project's topics, their schemas and keys."""
    from streams.topics import TOPICS, topic_name

    settings = get_settings()
    table = Table("topic", "schema", "key", "holds")
    for role, t in TOPICS.items():
        table.add_row(
            topic_name(settings, role), f"schemas/{t.schema}.avsc", t.key_field or "-", t.doc
        )
    console.print(table)


# --- produce / consume ----------------------------------------------------------------------


UserOption = Annotated[str, typer.Option("--user", "-u", help="User id to recommend for.")]
KOption = Annotated[int, typer.Option("--k", "-k", help="Number of items wanted.")]
ExcludeOption = Annotated[
    list[str] | None, typer.Option("--exclude", "-x", help="Item id never to recommend.")
]
TemperatureOption = Annotated[
    float | None, typer.Option(help="Sampling temperature; 0 = greedy (default: the server's).")
]
SeedOption = Annotated[int | None, typer.Option(help="Seed of the sampling.")]


def _client():
    from streamrec.client import Client

    return Client(bootstrap=_bootstrap())


FileOption = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        help="A JSON-lines file of records to produce instead of the flags: fields as in "
        "schemas/<topic>.avsc; missing ids and times are generated (new ids, now).",
    ),
]


@produce_app.command("interaction")
def produce_interaction(
    user: Annotated[str | None, typer.Option("--user", "-u", help="User id.")] = None,
    item: Annotated[str | None, typer.Option("--item", "-i", help="Item id.")] = None,
    event_type: Annotated[
        str, typer.Option("--type", help=f"One of {', '.join(EVENT_TYPES)}.")
    ] = "click",
    value: Annotated[float | None, typer.Option(help="A rating, a price, seconds...")] = None,
    request_id: Annotated[
        str | None, typer.Option(help="The response this interaction follows from.")
    ] = None,
    file: FileOption = None,
) -> None:
    """A user interacted with an item.

    The workers update the user's features and seen items within milliseconds; the event id
    makes it apply once, however often it is delivered."""
    from schemas.records import Interaction

    if file:
        return _produce_file(Interaction, file)
    if not user or not item:
        fail("--user and --item are needed (or --file)")
    if event_type not in EVENT_TYPES:
        fail(f"--type must be one of {', '.join(EVENT_TYPES)}")
    with _client() as client:
        event = client.track(user, item, event_type, value, request_id=request_id)
        client.flush()
    console.print(f"interaction {event.event_id}: user {user} {event_type} item {item}")


@produce_app.command("item-update")
def produce_item_update(
    item: Annotated[str | None, typer.Option("--item", "-i", help="Item id.")] = None,
    title: Annotated[str | None, typer.Option(help="Title.")] = None,
    year: Annotated[int | None, typer.Option(help="Release year.")] = None,
    genre: Annotated[
        list[str] | None, typer.Option("--genre", "-g", help="A genre (repeat for several).")
    ] = None,
    available: Annotated[
        bool, typer.Option(help="--no-available takes the item out of every list.")
    ] = True,
    file: FileOption = None,
) -> None:
    """Add, change, or take out (and back in) a catalog item.

    A new item is embedded and indexed at once; an unavailable one leaves every list."""
    from schemas.records import ItemUpdate

    if file:
        return _produce_file(ItemUpdate, file)
    if not item:
        fail("--item is needed (or --file)")
    with _client() as client:
        client.update_item(item, available=available, title=title, year=year, genres=genre or [])
        client.flush()
    state = "available" if available else "unavailable"
    console.print(f"item update: {item} ({state})")


@produce_app.command("request")
def produce_request(
    user: Annotated[str | None, typer.Option("--user", "-u", help="User id.")] = None,
    k: KOption = 10,
    exclude: ExcludeOption = None,
    temperature: TemperatureOption = None,
    seed: SeedOption = None,
    wait: Annotated[
        bool, typer.Option(help="Wait for the answer on the recommendations topic and print it.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
    file: FileOption = None,
) -> None:
    """Ask for recommendations over Kafka, as a service would.

    The request goes to the requests topic; its answer, matched by request id, comes back on
    the recommendations topic."""
    from schemas.records import RecommendationRequest
    from streamrec.client import RecommendationTimeout

    if file:
        return _produce_file(RecommendationRequest, file)
    if not user:
        fail("--user is needed (or --file)")
    with _client() as client:
        if not wait:
            request = RecommendationRequest(
                user, k, exclude or [], temperature=temperature, seed=seed
            )
            client.send(request)
            client.flush()
            console.print(f"request {request.request_id} for user {user} (k={k}) produced")
            return
        try:
            response = client.recommend(
                user, k, exclude=exclude or [], timeout=timeout, temperature=temperature, seed=seed
            )
        except RecommendationTimeout as e:
            fail(str(e))
    if not response.ok:
        fail(f"{response.status}: {response.error}")
    print_recommendations(response.to_record(), _titles())


def _field_problem(cls, fields) -> str | None:
    import dataclasses

    if not isinstance(fields, dict):
        return "not a JSON object"
    known = {f.name: f for f in dataclasses.fields(cls)}
    required = [
        name
        for name, f in known.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing := [name for name in required if name not in fields]:
        return f"missing {', '.join(missing)}"
    if unknown := sorted(set(fields) - set(known)):
        return f"unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})"
    return None


def _produce_file(cls, path: Path) -> None:
    """Every line of `path` as a `cls` record, checked before anything is produced."""
    from rich.progress import track

    from schemas.serde import EncodeError
    from streams.topics import role_for, serde_for

    serde = serde_for(get_settings(), role_for(cls.SCHEMA))
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            if problem := _field_problem(cls, fields):
                fail(f"{path}:{n}: not a valid {cls.__name__}: {problem}")
            record = cls(**fields)
            serde.encode(record.to_record())
        except (json.JSONDecodeError, EncodeError) as e:
            fail(f"{path}:{n}: not a valid {cls.__name__}: {e}")
        records.append(record)
    with _client() as client:
        for record in track(records, description=f"producing {len(records):,} records"):
            client.send(record)
        client.flush()
    console.print(f"{len(records):,} {cls.__name__} records produced from {path}")


@app.command("consume")
def consume(
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic name or role.")] = (
        "recommendations"
    ),
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep waiting for events.")
    ] = False,
    group: Annotated[
        str | None, typer.Option(help="Consumer group (default: a fresh one, reads everything).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print the decoded events of a topic (from the beginning; undecodable ones are flagged)."""
    from streams.kafka import EventConsumer
    from streams.topics import role_of

    settings = get_settings()
    try:
        role = role_of(settings, topic)
    except KeyError as e:
        fail(str(e.args[0]))
    consumer = EventConsumer(
        settings, _bootstrap(), [role], group or f"streamrec-cli-{uuid.uuid4().hex[:8]}"
    )
    seen = 0
    try:
        for event in consumer.events(idle_timeout=None if follow else 3.0):
            print_event(event, as_json)
            seen += 1
            if limit is not None and seen >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    if not as_json:
        err.print(f"[dim]{seen} events[/]")


def print_event(event, as_json: bool = False) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "topic": event.topic,
                    "partition": event.partition,
                    "offset": event.offset,
                    "value": event.value,
                    "error": event.error,
                },
                default=_json_default,
            )
        )
        return
    where = f"[dim]{event.topic}[{event.partition}]@{event.offset}[/]"
    if event.error:
        console.print(f"{where} [red]undecodable:[/] {event.error}")
    elif "items" in event.value and "request_id" in event.value:
        _print_response(where, event.value)
    elif {"processor", "error", "offset"} <= set(event.value):
        _print_dead_letter(where, event.value)
    else:
        console.print(where, _short(event.value))


def _print_response(where: str, r: dict) -> None:
    head = f"{where} response to [bold]{r['request_id']}[/] user {r['user_id']}: {r['status']}"
    if r["error"]:
        head += f" ([red]{r['error']}[/])"
    console.print(head)
    if r["items"]:
        table = Table("#", "item", "score", box=None, padding=(0, 1))
        for i, item in enumerate(r["items"], 1):
            table.add_row(str(i), item["item_id"], f"{item['score']:.4f}")
        console.print(table)


def _print_dead_letter(where: str, d: dict) -> None:
    console.print(
        f"{where} [red]rejected[/] {d['topic']}[{d['partition']}]@{d['offset']} "
        f"by {d['processor'] or 'a processor'}: [bold]{d['error']}[/]"
    )
    key = d["key"].decode(errors="replace") if d["key"] is not None else "-"
    console.print(f"  key {key!r}, {len(d['value'])} bytes: {d['value'][:48]!r}", markup=False)


def _short(value: dict) -> str:
    return json.dumps(value, default=_json_default)[:400]


def _json_default(o):
    return o.hex() if isinstance(o, bytes) else str(o)


# --- offline ----------------------------------------------------------------------------------

DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="ml-100k (fetched once from the recbole wheel), synthetic:USERS,ITEMS,EVENTS[,SEED], "
        "or a directory of RecBole atomic files (.inter/.user/.item).",
    ),
]


def _load_data(spec: str):
    from models.data import DataUnavailable, load

    settings = get_settings()
    try:
        with console.status(f"loading {spec}"):
            return load(spec, settings.data_dir)
    except DataUnavailable as e:
        fail(str(e))


@app.command("train")
def train_cmd(
    data: DataOption = "ml-100k",
    retrieval_epochs: Annotated[int, typer.Option(help="Two-tower epochs.")] = 8,
    ranker_epochs: Annotated[int, typer.Option(help="DLRM epochs.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of everything random.")] = 0,
    sequence: Annotated[
        bool,
        typer.Option(
            help="The user tower also reads the recent items in order (attention from the last "
            "item, position embeddings). Off by default: on ML-100K's validation slice it helped "
            "retrieval alone, not the four-stage pipeline."
        ),
    ] = False,
    features: Annotated[
        bool, typer.Option(help="Load the feature state into Feast/Redis after training.")
    ] = True,
) -> None:
    """Train retrieval and ranking on a temporal split, evaluate, export the artifacts.

    Writes <artifact_dir>/<version>/ (ONNX models, Faiss index, workflow, manifest, Feast repo)
    and points <artifact_dir>/current at it.
    """
    from models.evaluate import markdown_table
    from models.train import TrainConfig, train
    from streamrec.quiet import load_tensorflow

    load_tensorflow()

    settings = get_settings()
    dataset = _load_data(data)
    cfg = TrainConfig(
        retrieval_epochs=retrieval_epochs, ranker_epochs=ranker_epochs, seed=seed, sequence=sequence
    )
    started = time.monotonic()
    with console.status("training") as status:

        def step(message: str) -> None:
            console.print(f"[dim]{time.monotonic() - started:6.1f}s[/] {message}")
            status.update(message.strip())

        out = train(dataset, settings.artifact_dir, cfg, step)
    manifest = Artifacts(out).manifest
    if features:
        _load_features(out)
    _print_summary(manifest)
    console.print(markdown_table(manifest["metrics"]["evaluation"]))
    console.print(f"[green]artifacts[/] {out}")


def _load_features(artifact_dir) -> None:
    from streamrec.deploy import deploy

    stack = _stack()
    try:
        with console.status("loading features into Feast (offline store + Redis)"):
            done = deploy(get_settings(), stack, artifact_dir, start=False)
    except (StartupError, StackNotRunning) as e:
        fail(str(e))
    console.print(f"features loaded into Feast, online store {stack.endpoint('redis')}")
    record = done.snapshot
    if record["error"]:
        err.print(
            f"[yellow]warning:[/] {record['error']}: stream offsets not recorded, so "
            "`streamrec state rebuild` cannot restore this snapshot"
        )


def _print_summary(manifest: dict) -> None:
    m = manifest["metrics"]
    table = Table("", "", title=f"model {manifest['version']}", show_header=False)
    d = manifest["data"]
    table.add_row(
        "data",
        f"{manifest['dataset']}: {d['train']:,} train / {d['test']:,} test "
        f"interactions, {d['items']:,} items",
    )
    table.add_row("training time", f"{manifest['train_seconds']} s")
    table.add_row(
        "ranker (hold-out)", f"AUC {m['ranker']['auc']:.4f}, logloss {m['ranker']['logloss']:.4f}"
    )
    table.add_row(
        "ANN index",
        f"{manifest['index']['type']}, recall vs exact@100 "
        f"{manifest['index']['recall_vs_exact@100']:.3f}",
    )
    parity = ", ".join(f"{k} {v:.1e}" for k, v in m["onnx_max_abs_diff"].items())
    table.add_row("ONNX vs Keras", f"max abs diff {parity}")
    console.print(table)


@app.command("evaluate")
def evaluate_cmd(
    data: DataOption = "ml-100k",
    output: Annotated[
        str | None,
        typer.Option(
            help="Write the results as JSON here (default: beside the artifacts, "
            "evaluation.json or prequential.json)."
        ),
    ] = None,
    prequential: Annotated[
        bool,
        typer.Option(
            "--prequential",
            help="Replay the hold-out in time order (recommend, then learn) and compare the "
            "pipeline with time-decayed popularity, EASE with fold-in and SASRec, with per-user "
            "standard errors and paired differences (trains the baselines: a few minutes).",
        ),
    ] = False,
) -> None:
    """Recall@10/50, NDCG@10 and coverage on the temporal hold-out for most-popular,
    retrieval alone and the four-stage pipeline, warm and cold-at-cut users apart."""
    from pathlib import Path

    from rich.progress import Progress

    from models.evaluate import evaluate_artifacts, markdown_table
    from schemas.artifacts import Artifacts, current_artifacts

    settings = get_settings()
    try:
        artifacts = current_artifacts(settings.artifact_dir)
    except FileNotFoundError as e:
        fail(str(e))
    dataset = _load_data(data)
    if prequential:
        from models import prequential as pq
        from streamrec.quiet import load_tensorflow

        load_tensorflow()

        result = pq.prequential(artifacts, dataset, pq.PrequentialConfig(), console.print)
        path = Path(output) if output else artifacts / Artifacts.PREQUENTIAL
        path.write_text(json.dumps(result, indent=2))
        console.print(pq.markdown_table(result), soft_wrap=True)
        console.print(f"written to {path}")
        return
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=None)
        result = evaluate_artifacts(
            artifacts, dataset, lambda n: progress.update(task, completed=n)
        )
    path = Path(output) if output else artifacts / Artifacts.EVALUATION
    path.write_text(json.dumps(result, indent=2))
    console.print(markdown_table(result))
    console.print(f"written to {path}")


# --- serving --------------------------------------------------------------------------------

serve_app = typer.Typer(help="Run the online side: the Triton ensemble and the stream workers.")
app.add_typer(serve_app, name="serve")


def _artifacts():
    from schemas.artifacts import current_artifacts

    try:
        return current_artifacts(get_settings().artifact_dir)
    except FileNotFoundError as e:
        fail(str(e))


@serve_app.command("triton")
def serve_triton(
    instances: Annotated[int, typer.Option(help="Instances of each model.")] = 1,
    layout: Annotated[
        str,
        typer.Option(
            help="How the six operators map to Triton models: executor (one model runs them "
            "all, fastest), fused (two models) or stages (one model each)."
        ),
    ] = "executor",
    max_batch: Annotated[int, typer.Option(help="Most requests Triton batches together.")] = 64,
    queue_delay_us: Annotated[
        int, typer.Option(help="How long Triton waits to fill a batch (microseconds).")
    ] = 200,
    candidates: Annotated[
        int | None,
        typer.Option(help="Items retrieval hands to ranking (default: STREAMREC_CANDIDATES, 300)."),
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Default sampling temperature (0 = greedy).")
    ] = 0.0,
    max_per_genre: Annotated[
        int, typer.Option(help="At most this many items per primary genre (0 = no limit).")
    ] = 0,
) -> None:
    """Export the current artifacts as a Triton model repository and (re)start Triton on it.

    With STREAMREC_TRITON_URL set, only exports: point that server at the printed repository.
    """
    from serving.triton_export import ENSEMBLE, LAYOUTS
    from streamrec.deploy import deploy

    if layout not in LAYOUTS:
        fail(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    settings = get_settings()
    if candidates is not None:
        settings = settings.model_copy(update={"candidates": candidates})
    artifacts = _artifacts()
    try:
        with console.status(f"exporting {artifacts.name}, (re)starting tritonserver"):
            done = deploy(
                settings,
                _stack(),
                artifacts,
                load=False,
                serving={"temperature": temperature, "max_per_genre": max_per_genre},
                instances=instances,
                layout=layout,
                max_batch=max_batch,
                queue_delay_us=queue_delay_us,
            )
    except (StartupError, StackNotRunning) as e:
        fail(str(e))
    console.print(f"exported {artifacts.name} to {done.repository}")
    if done.triton is None:
        console.print(
            f"Triton is external ({settings.triton_url}): load model '{ENSEMBLE}' "
            "from that repository there."
        )
        return
    console.print(f"[green]Triton serving '{ENSEMBLE}'[/] at {done.triton} (gRPC)")


@serve_app.command("workers")
def serve_workers(
    workers: Annotated[int, typer.Option("--workers", "-n", help="Worker processes to start.")] = 1,
) -> None:
    """Start stream workers: interactions → features/filters, item updates → catalog,
    requests → Triton → responses. They run until `streamrec serve stop` or `stack down`."""
    from streamrec.workers import Workers
    from streams.topics import create_topics

    settings = get_settings()
    _artifacts()
    try:
        create_topics(settings, _stack().endpoint("kafka"))
        with console.status(f"starting {workers} worker(s)"):
            running = Workers(settings).start(workers)
    except (StartupError, StackNotRunning) as e:
        fail(str(e))
    table = Table("pid", "metrics", "log", title=f"{len(running)} stream worker(s)")
    for w in running:
        table.add_row(str(w.pid), f"http://127.0.0.1:{w.metrics_port}/metrics", w.log)
    console.print(table)


@serve_app.command("stop")
def serve_stop() -> None:
    """Stop the stream workers (by PID, gracefully: they commit their offsets)."""
    from streamrec.workers import Workers

    console.print(f"stopped {Workers(get_settings()).stop_all()} worker(s)")


@serve_app.command("status")
def serve_status() -> None:
    """Health of each stream worker, from its metrics: serving path (canary inference through
    Triton), processors waiting for a dependency, consumer lag, retries and dead letters."""
    from streamrec.workers import Workers

    table = Table("pid", "serving", "stalled", "lag", "retries", "dead letters", "log")
    rows = Workers(get_settings()).health()
    for h in rows:
        serving = {1.0: "[green]ready[/]", 0.0: "[red]degraded[/]"}.get(h["serving_ready"], "?")
        stalled = ", ".join(h["stalled"]) or "-"
        table.add_row(
            str(h["pid"]),
            serving if h["up"] else "[red]no metrics[/]",
            f"[red]{stalled}[/]" if h["stalled"] else stalled,
            f"{h['lag']:.0f}",
            f"{h['retries']:.0f}",
            f"{h['dead_letters']:.0f}",
            h["log"],
        )
    console.print(table if rows else "no stream workers running")


def _serving() -> tuple:
    """The Triton servers (a change goes to each) and the model repository the versions are
    exported into."""
    from serving.pool import TritonServers

    stack = _stack()
    try:
        return TritonServers(stack.endpoint("triton")), stack.root / "triton" / "models"
    except StackNotRunning as e:
        fail(str(e))
        raise


@serve_app.command("trainer")
def serve_trainer(
    data: DataOption = "ml-100k",
    every_events: Annotated[
        int, typer.Option(help="Run a cycle after this many new interactions.")
    ] = 5000,
    every_minutes: Annotated[
        float, typer.Option(help="... or after this many minutes (with 200+ new interactions).")
    ] = 60.0,
    gate_share: Annotated[
        float,
        typer.Option(
            help="Newest share of a cycle's events the gate tests on (trained next time)."
        ),
    ] = 0.25,
    margin: Annotated[
        float, typer.Option(help="NDCG@10 a candidate must gain over the serving version.")
    ] = 0.0,
    max_cycles: Annotated[int, typer.Option(help="Stop after this many cycles (0: never).")] = 0,
) -> None:
    """Train continuously on the interactions topic (own consumer group): every cycle fine-tunes
    the serving version on the new events, tests the candidate against it on the newest ones,
    and promotes it into Triton only if it is better. Decisions go to
    <artifact_dir>/decisions.jsonl (`streamrec models list`)."""
    import logging

    from streamrec.quiet import load_tensorflow
    from streams.kafka import EventConsumer
    from streams.trainer import Trainer, TrainerConfig

    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(message)s")
    logging.getLogger("streamrec").setLevel(logging.INFO)  # its decisions, always
    load_tensorflow()
    triton, repository = _serving()
    cfg = TrainerConfig(
        every_events=every_events,
        every_s=every_minutes * 60,
        gate_share=gate_share,
        margin=margin,
    )
    with console.status("loading the serving version's models and state"):
        trainer = Trainer(_load_data(data), settings.artifact_dir, repository, triton, cfg)
    consumer = EventConsumer(
        settings, _bootstrap(), ["interactions"], group=f"{settings.worker_group}-trainer"
    )
    console.print(f"training from {trainer.serving.name}; Ctrl-C stops")
    try:
        trainer.run(consumer, stop=lambda: False, max_cycles=max_cycles or None)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


models_app = typer.Typer(help="The artifact versions: list them, promote one, roll back.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """Every version under the artifact directory, the one Triton serves, and the decisions
    taken about each (with their NDCG@10 figures)."""
    from schemas.artifacts import decisions, list_versions
    from serving.pool import TritonServers

    settings = get_settings()
    try:
        served = TritonServers(_stack().endpoint("triton")).served_version()
    except Exception:  # noqa: BLE001 - Triton down: still list what is on disk
        served = None
    last = {}
    for d in decisions(settings.artifact_dir):
        last[d.get("candidate") or d.get("version")] = d
    table = Table("version", "created", "parent", "status", "last decision")
    for v in list_versions(settings.artifact_dir):
        d = last.get(v["version"], {})
        figures = f" (NDCG@10 {d['diff']:+.4f} ± {d['diff_se']:.4f})" if "diff" in d else ""
        table.add_row(
            v["version"],
            v["created"],
            v["parent"] or "-",
            "[green]serving[/]" if v["version"] == served else "",
            f"{d.get('action', '')}{figures} {d.get('time', '')}".strip(),
        )
    console.print(table)
    if served is None:
        console.print("[yellow]Triton is not reachable: the serving version is unknown[/]")


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="A version under the artifact directory.")],
) -> None:
    """Serve VERSION now (Triton switches with no failed request) and log the decision."""
    from serving.rollout import ExperimentRunning, promote

    root = get_settings().artifact_dir
    if not (root / version / Artifacts.MANIFEST).exists():
        fail(f"no version {version!r} under {root} (see `streamrec models list`)")
    triton, repository = _serving()
    try:
        d = promote(root / version, root, repository, triton, {"reason": "by hand"})
    except ExperimentRunning as e:
        fail(str(e))
    console.print(f"serving {d['version']} (was {d['previous']}; switched in {d['switch_s']} s)")


@models_app.command("rollback")
def models_rollback() -> None:
    """Serve again the version the last promotion or rollback replaced."""
    from serving.rollout import ExperimentRunning, rollback

    triton, repository = _serving()
    try:
        d = rollback(get_settings().artifact_dir, repository, triton)
    except (LookupError, ExperimentRunning) as e:
        fail(str(e))
    console.print(f"serving {d['version']} (was {d['previous']}; switched in {d['switch_s']} s)")


ab_app = typer.Typer(
    help="A/B tests: two artifact versions served side by side, users split by a hash of their "
    "id (sticky), every response naming its arm; the report attributes clicks to arms."
)
app.add_typer(ab_app, name="ab")


@ab_app.command("start")
def ab_start(
    control: Annotated[str, typer.Argument(help="The control arm's artifact version.")],
    treatment: Annotated[str, typer.Argument(help="The treatment arm's artifact version.")],
    treatment_share: Annotated[
        float, typer.Option(help="Share of the users in the treatment arm.", min=0.0, max=1.0)
    ] = 0.5,
    salt: Annotated[
        str | None, typer.Option(help="Seed of the split (default: new for each test).")
    ] = None,
) -> None:
    """Serve CONTROL and TREATMENT side by side.

    Both are loaded on Triton; the workers route each user to their arm's version within a
    second."""
    from serving.rollout import start_test

    root = get_settings().artifact_dir
    for version in (control, treatment):
        if not (root / version / Artifacts.MANIFEST).exists():
            fail(f"no version {version!r} under {root} (see `streamrec models list`)")
    if not 0 < treatment_share < 1:
        fail("--treatment-share must be strictly between 0 and 1")
    triton, repository = _serving()
    arms = [
        ("control", root / control, 1 - treatment_share),
        ("treatment", root / treatment, treatment_share),
    ]
    try:
        test = start_test(arms, root, repository, triton, salt or uuid.uuid4().hex[:8])
    except ValueError as e:
        fail(str(e))
    for arm in test.arms:
        console.print(f"{arm.name}: {arm.version} for {arm.share:.0%} of the users")


@ab_app.command("stop")
def ab_stop(
    keep: Annotated[str, typer.Option(help="The arm whose version everyone gets now.")] = "control",
) -> None:
    """End the test: every user on KEEP's version, the other one unloaded."""
    from serving.rollout import stop_test

    triton, repository = _serving()
    try:
        d = stop_test(keep, get_settings().artifact_dir, repository, triton)
    except LookupError as e:
        fail(str(e.args[0]))
    console.print(f"A/B test over: everyone on {d['version']} ({keep})")


@ab_app.command("report")
def ab_report(
    window_minutes: Annotated[
        float,
        typer.Option(
            help="An interaction without a request id counts for the user's latest response "
            "that showed the item at most this long before it."
        ),
    ] = 30.0,
) -> None:
    """Per arm: requests, clicks, CTR with a 95 % interval, and the difference.

    Reads the recommendations and interactions topics from their beginning."""
    from serving.arms import attribute, difference, wilson
    from streams.kafka import EventConsumer

    settings = get_settings()
    consumer = EventConsumer(
        settings, _bootstrap(), ["recommendations", "interactions"], f"ab-{uuid.uuid4().hex[:8]}"
    )
    responses, interactions = [], []
    with console.status("reading the recommendations and interactions topics"):
        try:
            for event in consumer.events(idle_timeout=3.0):
                if event.value is None:
                    continue
                target = responses if "items" in event.value else interactions
                target.append(event.value)
        finally:
            consumer.close()
    counts = attribute(responses, interactions, int(window_minutes * 60_000))
    if not counts:
        fail("no response names an arm: no A/B test has served requests yet")
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("arm", no_wrap=True)
    for name in ("requests", "shown", "clicks (by id)", "CTR", "95 % CI"):
        table.add_column(name, justify="right", no_wrap=True)
    for name, c in sorted(counts.items()):
        low, high = wilson(c.clicks, c.impressions)
        console.print(f"{name}: {', '.join(sorted(c.versions))}")
        table.add_row(
            name,
            f"{c.requests:,}",
            f"{c.impressions:,}",
            f"{c.clicks:,} ({c.by_request_id:,})",
            f"{c.ctr:.4f}",
            f"{low:.4f}-{high:.4f}",
        )
    console.print(table)
    if {"control", "treatment"} <= set(counts):
        d, low, high = difference(counts["control"], counts["treatment"])
        console.print(f"treatment − control CTR: {d:+.4f} (95 % CI {low:+.4f} to {high:+.4f})")


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8050,
    as_of: Annotated[
        int | None,
        typer.Option(
            help="Ask and click as of this time (epoch ms) instead of now: for a historical data "
            "set such as the demo's ML-100K, whose popularity has long decayed by today."
        ),
    ] = None,
) -> None:
    """A live web console: throughput, latency by stage, freshness, lag, dead letters; a user's
    recent items and recommendations with explanations; click an item to send an interaction."""
    import uvicorn

    from streamrec.console import app as console_app

    console.print(f"streamrec console on http://127.0.0.1:{port} (Ctrl-C stops)")
    app_ = console_app(get_settings(), _bootstrap(), as_of)
    uvicorn.run(app_, host="127.0.0.1", port=port, log_level="warning")


@app.command("recommend")
def recommend(
    user: UserOption,
    k: KOption = 10,
    exclude: ExcludeOption = None,
    temperature: TemperatureOption = None,
    seed: SeedOption = None,
) -> None:
    """Ask the Triton ensemble directly (no Kafka) and print the ranked items and stage timings."""
    print_recommendations(_ask_triton(user, k, exclude, temperature, seed), _titles())


@app.command("explain")
def explain(
    user: UserOption,
    k: KOption = 10,
    exclude: ExcludeOption = None,
    temperature: TemperatureOption = None,
    seed: SeedOption = None,
) -> None:
    """Why these items, in this order: each item's retrieval rank and score, the ranker's score
    and its inputs, what ordering did, and what each filter removed (straight to Triton)."""
    response = _ask_triton(user, k, exclude, temperature, seed, explain=True)
    print_explanations(response, _titles())


def _ask_triton(user, k, exclude, temperature, seed, explain: bool = False) -> dict:
    from schemas.records import RecommendationRequest
    from serving.operators import validate_request
    from serving.pool import TritonServers

    request = RecommendationRequest(
        user, k, exclude or [], temperature=temperature, seed=seed, explain=explain
    ).to_record()
    if error := validate_request(request):
        fail(error)
    try:
        return TritonServers(_stack().endpoint("triton")).recommend(request)
    except StackNotRunning as e:
        fail(str(e))
    except Exception as e:  # tritonclient's errors: server down, model not loaded
        fail(f"Triton did not answer: {e}. Is `streamrec serve triton` running?")


USER_FEATURES = ("log_user_events", "has_history", "log_idle_hours")  # the same for every item
ITEM_FEATURES = {
    "log_popularity": "log pop.",
    "genre_affinity": "genre",
    "recent_similarity": "recent",
}


def print_explanations(response: dict, items: dict[str, dict]) -> None:
    table = Table(
        title=f"user {response['user_id']} ({response['path']}, model "
        f"{response['model_version']}): why these items",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
        collapse_padding=True,
    )
    table.add_column("#", min_width=2)
    table.add_column("item", min_width=4)
    table.add_column("title", no_wrap=True, max_width=13)
    for name in ("retr.\nrank", "retr.\nscore", "ranker\nscore", *ITEM_FEATURES.values()):
        table.add_column(name, justify="right", min_width=6)
    table.add_column("ordering", no_wrap=True, min_width=16)
    reasons = response["explanations"]
    for n, e in enumerate(reasons, 1):
        table.add_row(
            str(n),
            e["item_id"],
            str(items.get(e["item_id"], {}).get("title") or ""),
            str(e["retrieval_rank"] or "-"),
            f"{e['retrieval_score']:.3f}",
            f"{e['ranker_score']:.3f}",
            *(f"{e['features'][f]:.2f}" if f in e["features"] else "-" for f in ITEM_FEATURES),
            e["ordering"],
        )
    console.print(table)
    features = next((e["features"] for e in reasons if e["features"]), {})
    user = ", ".join(f"{f} {features[f]:.2f}" for f in USER_FEATURES if f in features)
    removed = ", ".join(f"{n} {rule}" for rule, n in response["removed"].items())
    stages = {s["name"]: s for s in response["stages"]}
    source = reasons[0]["source"] if reasons else "retrieval"
    console.print(
        f"candidates: {stages['retrieval']['candidates_out']} from {source}; the filters "
        f"removed {removed}; the ranker scored {stages['scoring']['candidates_in']}\n"
        f"user features: {user or 'none'}"
    )


def _titles() -> dict[str, dict]:
    try:
        return Artifacts(_artifacts()).read(Artifacts.ITEMS)
    except (OSError, typer.Exit):
        return {}


def print_recommendations(response: dict, items: dict[str, dict]) -> None:
    table = Table(
        "#",
        "item",
        "title",
        "genres",
        "score",
        title=f"user {response['user_id']} ({response['path']}, model {response['model_version']})",
    )
    for n, item in enumerate(response["items"], 1):
        info = items.get(item["item_id"], {})
        table.add_row(
            str(n),
            item["item_id"],
            str(info.get("title") or ""),
            ", ".join(info.get("genres") or []),
            f"{item['score']:.4f}",
        )
    console.print(table)
    stages = "  ".join(
        f"{s['name']} {s['candidates_out']} in {s['duration_ms']:.2f} ms"
        for s in response["stages"]
    )
    console.print(f"[dim]{stages}; removed {response['removed']}[/]")


# --- replay ---------------------------------------------------------------------------------


@app.command("replay")
def replay_cmd(
    data: DataOption = "ml-100k",
    users: Annotated[int, typer.Option(help="Test users who get requests.")] = 100,
    points_per_user: Annotated[int, typer.Option(help="Requests per user.")] = 2,
    k: Annotated[int, typer.Option(help="Items per request.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the request points and sampling.")] = 0,
    speed: Annotated[
        float | None, typer.Option(help="N x real time (default: as fast as possible).")
    ] = None,
    barrier: Annotated[
        bool,
        typer.Option(
            help="Produce each request only after every earlier interaction is "
            "processed (deterministic state)."
        ),
    ] = True,
    bad_events: Annotated[bool, typer.Option(help="Inject undecodable and invalid events.")] = True,
    record: Annotated[
        str | None, typer.Option(help="Write the responses here (JSON lines).")
    ] = None,
) -> None:
    """Replay the data set's hold-out period through the live system (stack, Triton and
    workers must be running) and compare the served quality with the offline evaluation."""
    from pathlib import Path

    from rich.progress import Progress

    from state.store import RedisState
    from streams.replay import Recorder, build_timeline, produce_timeline

    settings = get_settings()
    dataset = _load_data(data)
    artifacts = _artifacts()
    try:
        bootstrap, redis_url = _stack().endpoint("kafka"), _stack().endpoint("redis")
    except StackNotRunning as e:
        fail(str(e))
    with console.status("building the timeline and its offline evaluation"):
        timeline = build_timeline(dataset, artifacts, users, points_per_user, k, seed, bad_events)
    state = RedisState(redis_url, prefix=settings.feast_project)
    ids = {s.record["request_id"] for s in timeline.requests}
    with Recorder(settings, bootstrap) as recorder, Progress(console=console) as progress:
        task = progress.add_task("replaying", total=len(timeline.steps))
        try:
            result = produce_timeline(
                timeline,
                settings,
                bootstrap,
                recorder,
                state.acked if barrier else None,
                speed,
                lambda n, _total: progress.update(task, completed=n),
            )
        except TimeoutError as e:
            fail(str(e))
        progress.update(task, description=f"collecting {len(ids)} responses")
        recorder.wait(ids, timeout=120)
        time.sleep(1.0)  # a moment more: duplicates would show here
        got = recorder.responses
        if record:
            recorder.write(Path(record))
    print_replay_summary(timeline, result, got, k)


def print_replay_summary(timeline, result, got: dict, k: int) -> None:
    from streams.replay import served_quality

    answered = [v[0] for v in got.values()]
    table = Table(
        "",
        "",
        title=f"replay: {result.produced['interactions']:,} interactions, "
        f"{result.produced['requests']} requests in {result.seconds:.1f} s",
        show_header=False,
    )
    table.add_row(
        "responses",
        f"{len(got)} of {len(timeline.requests)} requests "
        f"({sum(len(v) - 1 for v in got.values())} duplicates)",
    )
    table.add_row(
        "errors",
        ", ".join(f"{r['request_id']}: {r['error']}" for r in answered if r["status"] == "error")
        or "none",
    )
    table.add_row(
        "injected bad events",
        ", ".join(f"{n} {kind}" for kind, n in timeline.bad.items()) or "none",
    )
    for name, m in served_quality(timeline, got, k).items():
        table.add_row(name, "  ".join(f"{key} {v:.4f}" for key, v in m.items()))
    console.print(table)


# --- state ----------------------------------------------------------------------------------

state_app = typer.Typer(
    help="The online state (Redis: Feast rows, seen sets, popularity, catalog) and its "
    "rebuild from the Kafka log."
)
app.add_typer(state_app, name="state")


def _state_endpoints() -> tuple[str, str]:
    """(bootstrap, redis URL); starts the embedded Valkey if it is not running."""
    stack = _stack()
    try:
        bootstrap = stack.endpoint("kafka")
        stack.up(("redis",))
        return bootstrap, stack.endpoint("redis")
    except (StartupError, StackNotRunning) as e:
        fail(str(e))
        raise


def _days(ms: float) -> str:
    return f"{ms / 86_400_000:.1f} d"


@state_app.command(
    "check",
    help="Check that the topics still hold every event since the loaded snapshot (retention)."
    "\n\nFor each partition of the interactions and item-updates topics: the offset recorded "
    "with the snapshot, the earliest offset still retained (low watermark) and the end; and "
    "each topic's retention.ms against the snapshot's age. Exits 1 if events were deleted: "
    "the state could then not be rebuilt from the log.",
)
def state_check() -> None:
    from rich.markup import escape

    from streams.rebuild import (
        RetentionError,
        SnapshotError,
        check_retention,
        plan,
        read_snapshot,
        retention_ms,
        watermarks,
    )

    settings = get_settings()
    bootstrap = _bootstrap()
    try:
        record = read_snapshot(settings)
        marks = watermarks(settings, bootstrap)
    except SnapshotError as e:
        fail(escape(str(e)))
    except Exception as e:  # librdkafka
        fail(f"cannot read the topics' offsets from Kafka ({bootstrap}): {escape(str(e))}")
    ranges = plan(record, marks)
    age = time.time() * 1000 - record["loaded_at_ms"]
    table = Table(
        "topic",
        "partition",
        "snapshot offset",
        "earliest retained",
        "end",
        "to replay",
        title=f"snapshot {record['artifacts']}, loaded {_days(age)} ago",
    )
    for r in ranges:
        ok = r.earliest <= r.start <= r.end
        table.add_row(
            r.topic,
            str(r.partition),
            f"{r.start:,}",
            f"{r.earliest:,}" if ok else f"[red]{r.earliest:,}[/]",
            f"{r.end:,}",
            f"{r.events:,}",
        )
    console.print(table)
    for name, ms in retention_ms(settings, bootstrap).items():
        if ms < 0:
            note = "events are kept forever"
        elif ms > age:
            note = f"the snapshot is {_days(age)} old: {_days(ms - age)} left"
        else:
            note = f"[red]the snapshot is {_days(age)} old[/]: what it needs may go at any time"
        console.print(f"{name}: retention.ms {ms:,} ({_days(ms) if ms >= 0 else '∞'}); {note}")
    console.print("[dim](retention.bytes may delete sooner: the offsets above are what counts)[/]")
    try:
        check_retention(record, marks, ranges)
    except RetentionError as e:
        fail(escape(str(e)))
    console.print(
        f"[green]ok[/]: all {sum(r.events for r in ranges):,} events since the snapshot are "
        "retained; `streamrec state rebuild` can restore the state"
    )


_REBUILD_HELP = (
    "Rebuild the online state after a Redis loss: reload the training-time snapshot and replay "
    "the interactions and item-updates topics from the offsets recorded with it.\n\n"
    "Kafka is the source of truth: the topics' retention must cover the time since the snapshot "
    "was loaded (see `streamrec state check`). If events were deleted, this fails before "
    "touching Redis, and retraining is the way back.\n\n"
    "It first deletes streamrec's keys ('<project>:*') and the Feast project's online rows; "
    "other keys are left alone. Stale applied-event ids would otherwise turn the replayed events "
    "into duplicates, so it is also safe on a Redis that lost only part of its data.\n\n"
    "Stop the stream workers first (`streamrec serve stop`) and start them again afterwards: "
    "they resume from their own committed offsets and skip what the rebuild applied."
)


@state_app.command("rebuild", help=_REBUILD_HELP)
def state_rebuild(
    batch: Annotated[
        int | None, typer.Option(help="Events per processor batch (default: the workers').")
    ] = None,
) -> None:
    from redis.exceptions import RedisError
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from streamrec.workers import Workers
    from streams.rebuild import RetentionError, SnapshotError, rebuild

    settings = get_settings()
    if running := Workers(settings).running():
        fail(
            f"{len(running)} stream worker(s) running (pids "
            f"{', '.join(str(w.pid) for w in running)}): stop them first with "
            "`streamrec serve stop`, they would write to the state while it is rebuilt"
        )
    bootstrap, redis_url = _state_endpoints()
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        tasks: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = {"load": "loading the snapshot", "replay": "replaying the topics"}
                tasks[phase] = progress.add_task(label[phase], total=total or None)
            progress.update(tasks[phase], completed=done, total=total or None)

        try:
            result = rebuild(settings, bootstrap, redis_url, batch, on_progress)
        except (SnapshotError, RetentionError) as e:
            fail(escape(str(e)))
        except RedisError as e:
            fail(f"Redis ({redis_url}) failed during the rebuild: {escape(str(e))}; run it again")
        except Exception as e:  # librdkafka, Feast: say what and where, no traceback
            fail(f"the rebuild failed: {type(e).__name__}: {escape(str(e))}; run it again")
    table = Table("", "interactions", "item updates", title=f"rebuilt from {result.artifacts}")
    for name, counts in (
        ("events replayed", result.replayed),
        ("applied", result.applied),
        ("duplicates (already applied)", result.duplicates),
        ("undecodable or invalid (dead letters)", result.dead_letters),
    ):
        table.add_row(name, f"{counts['interactions']:,}", f"{counts['item_updates']:,}")
    console.print(table)
    console.print(
        f"cleared {result.cleared_keys:,} keys; snapshot loaded in {result.load_seconds:.1f} s, "
        f"{sum(result.replayed.values()):,} events replayed in {result.replay_seconds:.1f} s"
    )


# --- demo -----------------------------------------------------------------------------------


@app.command("demo")
def demo(
    keep: Annotated[
        bool, typer.Option(help="Leave the stack, Triton and the worker running afterwards.")
    ] = False,
    retrain: Annotated[
        bool, typer.Option(help="Train again even if trained artifacts exist.")
    ] = False,
) -> None:
    """The whole system on the embedded stack: train on ML-100K, serve on Triton, replay part
    of the hold-out through Kafka, show the stream's effect on recommendations, shut down."""
    from streamrec.demo import run_demo

    try:
        run_demo(get_settings(), console, keep=keep, retrain=retrain)
    except (StackNotRunning, StartupError) as e:
        fail(str(e))


if __name__ == "__main__":
    app()

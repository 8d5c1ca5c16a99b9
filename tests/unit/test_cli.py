from typer.testing import CliRunner

from streamrec.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("stack", "topics", "produce", "consume", "demo"):
        assert command in result.output


def test_a_missing_broker_is_a_readable_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("STREAMREC_KAFKA_BOOTSTRAP", raising=False)
    from schemas.settings import get_settings

    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["produce", "request", "--user", "1"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "streamrec stack up" in result.output
    assert "Traceback" not in result.output


def test_unknown_topic_is_a_readable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    from schemas.settings import get_settings

    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["consume", "--topic", "nope"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "unknown topic 'nope'" in result.output


def _isolated(tmp_path, monkeypatch, *args: str):
    """Run the CLI with a run and artifact directory of its own and no external services."""
    monkeypatch.setenv("STREAMREC_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("STREAMREC_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.delenv("STREAMREC_TRITON_URL", raising=False)
    from schemas.settings import get_settings

    get_settings.cache_clear()
    try:
        return runner.invoke(app, list(args))
    finally:
        get_settings.cache_clear()


def test_models_commands_are_listed_and_explain_what_is_missing(tmp_path, monkeypatch):
    assert "models" in runner.invoke(app, ["--help"]).output
    listed = _isolated(tmp_path, monkeypatch, "models", "list")
    assert listed.exit_code == 0 and "serving version is unknown" in listed.output
    promote = _isolated(tmp_path, monkeypatch, "models", "promote", "v9")
    assert promote.exit_code == 1 and "no version 'v9'" in promote.output
    rollback = _isolated(tmp_path, monkeypatch, "models", "rollback")
    assert rollback.exit_code == 1 and "streamrec stack up" in rollback.output
    for result in (listed, promote, rollback):
        assert "Traceback" not in result.output


def test_a_bad_line_in_a_file_is_named_and_nothing_is_produced(tmp_path, monkeypatch):
    """The file is checked before any broker is needed: no bootstrap is configured here."""
    monkeypatch.setenv("STREAMREC_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("STREAMREC_KAFKA_BOOTSTRAP", raising=False)
    events = tmp_path / "events.jsonl"
    events.write_text('{"user_id": "1", "item_id": "2"}\n{"user_id": "1"}\n')
    from schemas.settings import get_settings

    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["produce", "interaction", "--file", str(events)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "events.jsonl:2: not a valid Interaction: missing item_id" in " ".join(
        result.output.split()
    )
    assert "Traceback" not in result.output

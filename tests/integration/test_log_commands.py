"""``squall reindex`` and ``squall log export`` as an operator runs them:
real processes, on the embedded log and on MongoDB + OpenSearch."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, SECRET, ServerFactory, mongo_url, wait_for
from tests.services import ROOT, free_port

NAMESPACES = {"log": {"persist": True, "searchable": True, "allow_publish": True}}


def squall(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )  # fmt: skip


def toml(config: dict[str, Any]) -> str:
    lines = []
    for section, values in config.items():
        if section == "namespaces":
            for name, options in values.items():
                lines.append(f"[namespaces.{name}]")
                lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in options.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["embedded", "mongodb+opensearch"])
def backends(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    ferretdb = request.getfixturevalue("ferretdb")
    opensearch = request.getfixturevalue("opensearch")
    return {
        "store": {"url": mongo_url(ferretdb)},
        "search": {
            "url": opensearch.url,
            "engine": "opensearch",
            "index": f"squall-cli-{uuid.uuid4().hex[:8]}",
        },
    }


async def test_reindex_and_export(
    make_server: ServerFactory, tmp_path: Path, backends: dict[str, Any]
) -> None:
    data_dir = str(tmp_path / "data")
    config = {
        **backends,
        "server": {"data_dir": data_dir},
        "auth": {"token_secret": SECRET, "api_key": API_KEY},
        "namespaces": NAMESPACES,
    }
    search = {**config.get("search", {}), "interval": 0.05}
    run = await make_server({**config, "search": search})
    api = run.api()
    for n in range(1, 121):
        await api.publish(f"log:{'ab'[n % 2]}", {"text": f"entry {n} {'odd' if n % 2 else 'even'}"})
    indexer = run.node.indexer
    assert indexer is not None
    await wait_for(lambda: indexer.indexed >= 120, 30, "everything indexed")
    await run.node.close()
    path = tmp_path / "squall.toml"
    path.write_text(toml(config))

    done = squall("reindex", "-c", str(path), "--batch", "25")
    assert done.returncode == 0, done.stderr
    assert "reindexed 120 publications" in done.stdout
    assert "the index holds 120 documents" in done.stdout
    assert "120/120 100%" in done.stderr  # the progress line

    export = squall("log", "export", "-c", str(path), "--channel", "log:a")
    assert export.returncode == 0, export.stderr
    lines = [orjson.loads(line) for line in export.stdout.splitlines()]
    assert [line["offset"] for line in lines] == list(range(1, 61))
    assert {line["channel"] for line in lines} == {"log:a"}
    assert lines[0]["data"] == {"text": "entry 2 even"}
    assert "exported 60 publications" in export.stderr
    out = tmp_path / "all.jsonl"
    whole = squall("log", "export", "-c", str(path), "-o", str(out))
    assert whole.returncode == 0, whole.stderr
    assert len(out.read_text().splitlines()) == 120

    # After a reindex the index answers the same searches.
    second = await make_server({**config, "search": search})
    hits = (await second.api().search("odd", limit=100))["hits"]
    assert len(hits) == 60


def test_commands_refuse_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "squall.toml"
    path.write_text(toml({"server": {"data_dir": str(tmp_path / "d")}}))
    done = squall("reindex", "-c", str(path))
    assert done.returncode == 2
    assert "no namespace is searchable" in done.stderr
    done = squall("log", "export", "-c", str(path), "--channel", "nope:x")
    assert done.returncode == 2
    assert "unknown namespace" in done.stderr
    port = free_port()
    path.write_text(
        toml(
            {
                "server": {"data_dir": str(tmp_path / "d")},
                "store": {"url": f"mongodb://127.0.0.1:{port}/x", "timeout": 0.5, "retries": 0},
            }
        )
    )
    done = squall("log", "export", "-c", str(path))
    assert done.returncode == 1
    assert "export failed" in done.stderr and "mongodb" in done.stderr


async def test_reindex_in_process_reports_progress(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """The same jobs called as functions (how the CLI runs them)."""
    import io

    from server.config import load_settings
    from server.maintenance import export_log, reindex

    config = {
        "server": {"data_dir": str(tmp_path / "d")},
        "auth": {"token_secret": SECRET, "api_key": API_KEY},
        "namespaces": {**NAMESPACES, "quiet": {"persist": True}},
    }
    run = await make_server(config)
    for n in range(30):
        await run.api().publish("log:x" if n % 3 else "quiet:y", {"text": f"w{n}"})
    await run.node.close()
    settings = load_settings(raw=config, env={})
    progress = io.StringIO()
    read, held = await reindex(settings, batch=7, out=progress)
    assert (read, held) == (30, 20)  # every publication read, the searchable ones indexed
    assert progress.getvalue().splitlines()[-1].startswith("reindex: [")
    assert "30/30 100%" in progress.getvalue()
    out = io.StringIO()
    assert await export_log(settings, channel="quiet:y", out=out, batch=4) == 10
    assert [orjson.loads(line)["offset"] for line in out.getvalue().splitlines()] == list(
        range(1, 11)
    )

"""The OpenAPI 3.1 document at GET /api/openapi.json: it matches the
handlers' table, it is valid OpenAPI 3.1, and schemathesis, driven by it
against a live server, finds no 5xx, no answer off the schema and no
undocumented status (each bug it found has a regression test in
test_http_edges.py)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
import schemathesis
import tornado.httpclient

from handlers.api import ApiMethods
from tests.conftest import Running, ServerFactory

# A setup where every method can succeed: presence on, a searchable durable
# namespace; small list limits keep generated bodies (and the run) small.
FUZZ = {
    "namespaces": {
        "default": {"presence": True},
        "chat": {"persist": True, "searchable": True, "presence": True},
    },
    "search": {"interval": 0.05},
    "limits": {"max_broadcast_channels": 8, "max_batch_commands": 16},
}
# Cases per operation; CI keeps the run well under a minute. Raise it
# locally (SQUALL_FUZZ_EXAMPLES=200) for a deeper run.
EXAMPLES = int(os.environ.get("SQUALL_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("SQUALL_FUZZ_SEED", "20261202"))
CHECKS = ",".join(
    [
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
        "negative_data_rejection",
        "unsupported_method",
    ]
)


async def get_document(server: Running) -> dict[str, Any]:
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(f"{server.http_url}/api/openapi.json")  # no key
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    document: dict[str, Any] = orjson.loads(response.body)
    return document


def api_methods(document: dict[str, Any]) -> set[str]:
    """The ``POST /api/<method>`` operations, without batch."""
    return {
        path.removeprefix("/api/")
        for path, item in document["paths"].items()
        if path.startswith("/api/") and "post" in item and path != "/api/batch"
    }


async def test_every_api_method_is_documented_and_nothing_more(server: Running) -> None:
    document = await get_document(server)
    table = set(ApiMethods(server.node).table())
    assert api_methods(document) == table
    for name in table:
        operation = document["paths"][f"/api/{name}"]["post"]
        assert operation["operationId"] == name
        assert "application/json" in operation["requestBody"]["content"]
        result = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert result["required"] == ["result"]
        for code in ("400", "401", "413"):
            assert code in operation["responses"], (name, code)
    assert set(document["paths"]["/api/search"]) == {"get", "post"}
    batch = document["paths"]["/api/batch"]["post"]
    assert set(batch["requestBody"]["content"]) == {"application/json", "application/x-ndjson"}
    for path in ("/health", "/ready", "/status", "/metrics", "/api/openapi.json"):
        assert document["paths"][path]["get"]["security"] == []
    assert document["components"]["securitySchemes"]["apikey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "`Authorization: apikey <key>` (auth.api_key)",
    }


async def test_document_follows_the_configured_limits(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_broadcast_channels": 7, "max_batch_commands": 9}})
    document = await get_document(server)
    broadcast = document["paths"]["/api/broadcast"]["post"]["requestBody"]["content"]
    assert broadcast["application/json"]["schema"]["properties"]["channels"]["maxItems"] == 7
    batch = document["paths"]["/api/batch"]["post"]["requestBody"]["content"]
    assert batch["application/json"]["schema"]["properties"]["commands"]["maxItems"] == 9


def schemas_in(node: Any) -> list[dict[str, Any]]:
    """Every Schema Object of the document (under a ``schema`` key, and the
    components)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                found.append(value)
            else:
                found += schemas_in(value)
    elif isinstance(node, list):
        for item in node:
            found += schemas_in(item)
    return found


async def test_document_is_valid_openapi_3_1(server: Running) -> None:
    document = await get_document(server)
    assert document["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # the OpenAPI 3.1 meta-schema; raises when invalid
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in document["paths"].values())
    # Each Schema Object is valid JSON Schema 2020-12 (OpenAPI 3.1's dialect).
    found = schemas_in(document["paths"]) + list(document["components"]["schemas"].values())
    assert len(found) > 30
    for item in found:
        jsonschema_rs.meta.validate(item)


async def test_document_rejects_what_it_should(server: Running) -> None:
    """The schemas are not vacuous: a real reply conforms, a wrong one not."""
    document = await get_document(server)
    publish = document["paths"]["/api/publish"]["post"]
    params = publish["requestBody"]["content"]["application/json"]["schema"]
    assert jsonschema_rs.is_valid(params, {"channel": "news", "data": {"x": 1}})
    assert not jsonschema_rs.is_valid(params, {"channel": "news"})
    assert not jsonschema_rs.is_valid(params, {"channel": "bad name", "data": 1})
    result = publish["responses"]["200"]["content"]["application/json"]["schema"]
    reply = {"result": await server.api().publish("news", 1)}
    assert jsonschema_rs.is_valid(result, reply)
    assert not jsonschema_rs.is_valid(result, {"result": {"offset": "1"}})


@pytest.mark.timeout(240)
async def test_schemathesis_finds_nothing(make_server: ServerFactory, tmp_path: Path) -> None:
    """schemathesis (examples, coverage and fuzzing phases, positive and
    negative data) against a live server: no 5xx, every answer on the
    schema with a documented status and content type, wrong HTTP methods
    405, schema-violating input refused."""
    server = await make_server(FUZZ)
    await server.api().publish("chat:lobby", {"text": "deploy rolled back"})
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.http_url}/api/openapi.json",
        "--header",
        f"Authorization: apikey {server.settings.auth.api_key}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 200)
    except TimeoutError:
        process.kill()  # our own child, by its handle
        await process.wait()
        raise AssertionError("schemathesis did not finish in 200 s") from None
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    # Every operation was run (schemathesis leaves out the document's own
    # URL), and cases were run.
    operations = sum(len(item) for item in (await get_document(server))["paths"].values())
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", text)
    assert selected is not None, text[-3000:]
    assert len(set(selected.groups())) == 1, selected.group(0)
    assert int(selected.group(1)) >= operations - 1
    cases = re.search(r"(\d+) generated, (\d+) passed", text)
    assert cases is not None and int(cases.group(2)) >= 10 * operations, text[-1000:]

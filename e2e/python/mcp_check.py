"""Drives the worker's MCP server with the official MCP Python SDK (`mcp`) as a real client:
lists the tools, calls each one and checks the results, over streamable HTTP and over stdio.

    mcp_check.py http URL            (MEMU_API_KEY: read and write key; MEMU_READ_KEY: read only)
    mcp_check.py stdio WORKER_BINARY (the worker's environment is passed on; MEMU_API_KEY)

Exits non-zero on the first failed check.
"""

import asyncio
import os
import sys

import checks
import httpx2
from checks import check
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

TOOLS = {
    "memorize",
    "memorize_status",
    "retrieve",
    "list_categories",
    "list_memories",
    "delete_memory",
    "forget_user",
}


async def call(client, name, arguments):
    result = await client.call_tool(name, arguments)
    check(not result.is_error, f"{name} {arguments}: {result}")
    return result.structured_content


async def exercise(client, user):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    check(set(tools) == TOOLS, f"tools {sorted(tools)}")
    for tool in tools.values():
        check(len(tool.description or "") > 30, f"{tool.name} is described")
        check(tool.input_schema["type"] == "object", f"{tool.name} schema")
    check("user_id" in tools["retrieve"].input_schema["required"], "retrieve needs user_id")
    check(tools["retrieve"].annotations.read_only_hint, "retrieve only reads")
    check(tools["forget_user"].annotations.destructive_hint, "forget_user destroys")

    done = await call(client, "memorize", {
        "user_id": user,
        "user_name": "Lena",
        "conversation": [
            {"role": "user", "content": "I moved to Berlin last year and I work as a nurse."},
            {"role": "assistant", "content": "Welcome to Berlin!"},
            {"role": "user", "content": "I am allergic to peanuts, so I cook at home."},
        ],
        "wait_seconds": 60,
    })
    check(done["status"] == "SUCCESS", f"memorize waited for its job: {done}")
    status = await call(client, "memorize_status", {"task_id": done["task_id"]})
    check(status["status"] == "SUCCESS" and status["user_id"] == user, f"status {status}")

    found = await call(client, "retrieve", {"user_id": user, "query": "Which city does Lena live in?"})
    check(found["items"] and "Berlin" in found["items"][0]["summary"], f"retrieve {found}")
    check(found["categories"], "categories ranked too")
    other = await call(client, "retrieve", {"user_id": user + "-other", "query": "Berlin"})
    check(other["items"] == [], "another user's memories stay private")

    categories = await call(client, "list_categories", {"user_id": user})
    check(any(c["summary"] for c in categories["categories"]), f"categories {categories}")

    listed = await call(client, "list_memories", {"user_id": user})
    check(len(listed["items"]) >= 2, f"memories {listed}")
    victim = listed["items"][0]["id"]
    gone = await call(client, "delete_memory", {"user_id": user, "memory_id": victim})
    check(gone["deleted"], "deleted")
    relisted = await call(client, "list_memories", {"user_id": user})
    check(victim not in [i["id"] for i in relisted["items"]], "the deleted memory is gone")
    check(len(relisted["items"]) == len(listed["items"]) - 1, "and only it")

    # Errors come back as tool errors naming the field, like the HTTP API's 422.
    bad = await client.call_tool("retrieve", {"user_id": user, "query": "x", "top_k": 0})
    check(bad.is_error and bad.structured_content["error"]["field"] == "top_k", f"{bad}")
    missing = await client.call_tool("retrieve", {"query": "x"})
    check(missing.is_error, "missing user_id refused")
    unknown = await client.call_tool("memorize_status", {"task_id": "not-a-uuid"})
    check(unknown.is_error and unknown.structured_content["status"] == 422, f"{unknown}")

    receipt = await call(client, "forget_user", {"user_id": user})
    check(receipt["deleted"]["memory_items"] >= 1, f"forget {receipt}")
    empty = await call(client, "list_memories", {"user_id": user})
    check(empty["items"] == [], "nothing left of the user")


async def over_http(url):
    timeout = httpx2.Timeout(30.0, read=120.0)
    headers = {"Authorization": f"Bearer {os.environ['MEMU_API_KEY']}"}
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            check(client.server_info.name == "memu-worker", f"{client.server_info}")
            await exercise(client, "lena-http")
    read_only = {"Authorization": f"Bearer {os.environ['MEMU_READ_KEY']}"}
    async with httpx2.AsyncClient(headers=read_only, timeout=timeout) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            refused = await client.call_tool("forget_user", {"user_id": "lena-http"})
            check(refused.is_error and refused.structured_content["status"] == 403, f"{refused}")
            allowed = await client.call_tool("list_memories", {"user_id": "lena-http"})
            check(not allowed.is_error, "a read-only key reads")
    # No key: the HTTP layer answers 401 before any MCP message is read.
    async with httpx2.AsyncClient(timeout=timeout) as http:
        response = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                   headers={"Accept": "application/json, text/event-stream"})
        check(response.status_code == 401, f"no key: {response.status_code}")


async def over_stdio(binary):
    params = StdioServerParameters(command=binary, args=["mcp"], env=dict(os.environ))
    async with Client(params) as client:
        await exercise(client, "lena-stdio")


if __name__ == "__main__":
    transport, target = sys.argv[1], sys.argv[2]
    asyncio.run(over_http(target) if transport == "http" else over_stdio(target))
    print(f"MCP {transport}: {checks.passed} checks passed")

"""Drives memU's published Python SDK (memu-py, MemuClient) against a running worker: every
call the SDK makes, parsed by the SDK's own pydantic models, and its error classes.

Environment: MEMU_API_BASE_URL, MEMU_API_KEY (read and write), MEMU_READ_KEY (read only).
Exits non-zero on the first failed check.
"""

import os

import checks
from checks import check, expect
from memu.sdk.python import MemuClient
from memu.sdk.python.exceptions import (
    MemuAuthenticationException,
    MemuValidationException,
)
from memu.sdk.python.models import (
    DefaultCategoriesResponse,
    DeleteMemoryResponse,
    MemorizeResponse,
    MemorizeTaskStatusResponse,
    RelatedClusteredCategoriesResponse,
    RelatedMemoryItemsResponse,
)

BASE = os.environ["MEMU_API_BASE_URL"]
KEY = os.environ["MEMU_API_KEY"]
client = MemuClient(base_url=BASE, api_key=KEY, max_retries=0)


def wait(task_id):
    def read():
        status = client.get_task_status(task_id)
        check(isinstance(status, MemorizeTaskStatusResponse), "status parses")
        return status

    return checks.poll(read, lambda s: s.status in ("SUCCESS", "FAILURE"), f"task {task_id}")


# memorize, both conversation forms, each polled to SUCCESS
queued = client.memorize_conversation(
    conversation=[
        {"role": "user", "content": "I live in Lisbon and I work as a marine biologist."},
        {"role": "assistant", "content": "Fascinating! What do you study?"},
        {"role": "user", "content": "Octopus behaviour. On weekends I go hiking in Sintra."},
    ],
    user_id="maria",
    user_name="Maria",
    agent_id="coach",
    agent_name="Coach",
)
check(isinstance(queued, MemorizeResponse), "memorize parses")
check(queued.status in ("PENDING", "STARTED", "SUCCESS"), f"queued status {queued.status}")
done = wait(queued.task_id)
check(done.status == "SUCCESS", f"messages memorized: {done}")

queued = client.memorize_conversation(
    conversation="Maria: My sister Ana is visiting from Porto next week.\nCoach: How lovely!",
    user_id="maria",
    user_name="Maria",
    agent_id="coach",
    agent_name="Coach",
    session_date="2026-03-01T10:00:00+00:00",
)
check(wait(queued.task_id).status == "SUCCESS", "text memorized")
again = client.memorize_conversation(
    conversation="Maria: My sister Ana is visiting from Porto next week.\nCoach: How lovely!",
    user_id="maria",
    user_name="Maria",
    agent_id="coach",
    agent_name="Coach",
)
check(again.task_id == queued.task_id, "the same conversation is stored once")

# default categories: summaries, then memories
categories = client.retrieve_default_categories(user_id="maria", agent_id="coach")
check(isinstance(categories, DefaultCategoriesResponse), "categories parse")
check(categories.total_categories == len(categories.categories) > 0, f"categories {categories}")
for category in categories.categories:
    check(category.is_active and category.memory_count > 0, f"active only: {category}")
    check(category.summary and category.memories is None, f"summary wanted: {category}")
    check(category.user_id == "maria" and category.agent_id == "coach", "scoped")
with_memories = client.retrieve_default_categories(user_id="maria", want_summary=False)
listed = [m for c in with_memories.categories for m in c.memories]
check(any("Lisbon" in m.content for m in listed), f"memories listed: {listed}")
everything = client.retrieve_default_categories(user_id="maria", include_inactive=True)
check(everything.total_categories >= categories.total_categories, "inactive ones added")
check(any(not c.is_active for c in everything.categories), "an empty category is inactive")

# related memory items
related = client.retrieve_related_memory_items(
    user_id="maria", query="Where does Maria live?", top_k=3, min_similarity=0.1
)
check(isinstance(related, RelatedMemoryItemsResponse), "related items parse")
check(1 <= related.total_found <= 3, f"found {related.total_found}")
best = related.related_memories[0]
check("Lisbon" in best.memory.content, f"best match: {best}")
scores = [r.similarity_score for r in related.related_memories]
check(scores == sorted(scores, reverse=True) and min(scores) >= 0.1, f"scores {scores}")
category = best.memory.category
within = client.retrieve_related_memory_items(
    user_id="maria", query="Maria", top_k=10, min_similarity=-1.0, include_categories=[category]
)
check(within.total_found >= 1, "the category filter keeps its members")
check(all(r.memory.category == category for r in within.related_memories), "and only them")
none = client.retrieve_related_memory_items(
    user_id="maria", query="Maria", min_similarity=-1.0, include_categories=["no_such_category"]
)
check(none.total_found == 0, "an unknown category matches nothing")
other = client.retrieve_related_memory_items(user_id="joao", query="Lisbon", min_similarity=-1.0)
check(other.total_found == 0, "another user sees nothing")

# related clustered categories
clustered = client.retrieve_related_clustered_categories(
    user_id="maria", category_query="where she lives and what she does", top_k=2, min_similarity=-1.0
)
check(isinstance(clustered, RelatedClusteredCategoriesResponse), "clustered parse")
check(1 <= clustered.total_categories_found <= 2, f"clustered {clustered}")
similarities = [c.similarity_score for c in clustered.clustered_categories]
check(similarities == sorted(similarities, reverse=True), "ranked")
raw = client.retrieve_related_clustered_categories(
    user_id="maria", category_query="family", top_k=1, min_similarity=-1.0, want_summary=False
)
check(raw.clustered_categories[0].memories, "memories instead of the summary")

# errors: the SDK's own exception classes
bad_key = MemuClient(base_url=BASE, api_key="memu_aaaaaaaaaaaa_" + "x" * 43, max_retries=0)
expect(MemuAuthenticationException, lambda: bad_key.get_task_status(queued.task_id), "bad key")
reader = MemuClient(base_url=BASE, api_key=os.environ["MEMU_READ_KEY"], max_retries=0)
expect(
    MemuAuthenticationException,
    lambda: reader.delete_memories(user_id="maria"),
    "a read-only key cannot delete",
)
check(reader.retrieve_default_categories(user_id="maria").total_categories > 0, "but can read")
expect(
    MemuValidationException,
    lambda: client.retrieve_related_memory_items(user_id="maria", query="x", top_k=0),
    "top_k 0 is refused",
)
expect(
    MemuValidationException,
    lambda: client.memorize_conversation(
        conversation=[{"role": "narrator", "content": "x"}],
        user_id="maria", user_name="Maria", agent_id="coach", agent_name="Coach",
    ),
    "an unknown role is refused",
)
expect(
    MemuValidationException,
    lambda: client.retrieve_default_categories(user_id=""),
    "an empty user_id is refused",
)

# delete: the agent's memories go, and nothing is found afterwards
deleted = client.delete_memories(user_id="maria", agent_id="coach")
check(isinstance(deleted, DeleteMemoryResponse), "delete parses")
check(deleted.success and deleted.deleted_count >= 2, f"deleted {deleted}")
after = client.retrieve_related_memory_items(user_id="maria", query="Lisbon", min_similarity=-1.0)
check(after.total_found == 0, "nothing left")

print(f"memu-py SDK: {checks.passed} checks passed")

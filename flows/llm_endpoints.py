"""The LLM endpoints of one run: each role's base URL, real or posttrain's simulated teacher.

    with llm_endpoints(spec, out) as endpoints:   # {"generator": url, "judge": url, ...}
        ...

A role whose `endpoint` is `simulated` is answered by the local teacher server
(agents/teacher), a real HTTP server speaking the OpenAI and Anthropic wire formats, started
for the run and stopped after it. It is always announced, on screen and in the run's tags.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agents.teacher import TeacherConfig, TeacherServer
from flows.spec import Spec


def simulated_roles(spec: Spec) -> list[str]:
    return [n for n, r in spec.llm.roles().items() if r.simulated]


def llm_tag(spec: Spec) -> str:
    """Who plays each role, e.g. `generator=simulated,judge=claude-sonnet-4-5`."""
    return ",".join(f"{n}={'simulated' if r.simulated else r.model}"
                    for n, r in spec.llm.roles().items())


@contextmanager
def llm_endpoints(spec: Spec, out: Path) -> Iterator[dict[str, str | None]]:
    """Each role's base URL for its SDK; the simulated teacher runs while the block does."""
    simulated = simulated_roles(spec)
    if not simulated:
        yield {name: role.endpoint for name, role in spec.llm.roles().items()}
        return
    server = TeacherServer(TeacherConfig(
        warehouse_url=spec.warehouse.url, table=spec.slicing.table,
        id_column=spec.slicing.id_column, gold_column=spec.task.gold_column,
        labels=spec.task.labels or [], kind=spec.task.kind, knobs=spec.llm.simulated,
        request_log=str(out / "teacher_requests.jsonl"),
    ))
    base = server.start()  # http://127.0.0.1:PORT/v1
    try:
        gold = "gold labels" if spec.task.kind == "classification" else "gold answers"
        print(f"No real LLM for {', '.join(simulated)}: posttrain's SIMULATED teacher at "
              f"{base} answers ({gold} with {spec.llm.simulated.error_rate:.0%} noise).")
        # the OpenAI SDK wants the /v1 base, the Anthropic SDK the root
        yield {name: (base if role.api == "openai" else base.removesuffix("/v1"))
               if role.simulated else role.endpoint
               for name, role in spec.llm.roles().items()}
    finally:
        server.stop()

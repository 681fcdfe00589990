"""The plan stage: the warehouse cut into slices, one per sub-agent.

One pass over the slicing table (flows/slicing.py) assigns each row to the evaluation holdout
or to a slice; the slices' row ids go to the example store, so every later read is by primary
key and a resumed run finds the same slices. On PostgreSQL the SELECT-only role the agents
read as is made sure of first.
"""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agents.sql_tool import ensure_reader_role
from flows.slicing import SliceDescriptor, plan_slices
from flows.spec import Spec
from flows.store import shared_store
from flows.warehouse import shared_engine


@task(name="plan-slices", cache_policy=NO_CACHE)
def plan(spec: Spec, store_url: str, run_id: str) -> list[SliceDescriptor]:
    engine = shared_engine(spec.warehouse.url)
    if engine.dialect.name == "postgresql":  # agents read as a SELECT-only role: make sure of it
        ensure_reader_role(engine, "posttrain_reader", spec.warehouse.tables)
    store = shared_store(store_url)  # holds the slices' row ids (an earlier plan's stay valid)
    slices = plan_slices(spec, engine, members=store, plan_id=run_id)
    store.add_slices(run_id, slices)
    get_run_logger().info(
        "%d slices, %d rows: %s", len(slices), sum(s.row_count for s in slices),
        ", ".join(f"{s.slice_id}({s.row_count})" for s in slices),
    )
    return slices

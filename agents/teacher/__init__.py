"""The simulated teacher: posttrain's embedded default LLM, a real local HTTP server.

With no API key and no internet, posttrain still runs end to end against it, through the
official `openai` and `anthropic` SDKs. It always announces itself: header
`x-posttrain-simulated: true`, `system_fingerprint: posttrain-simulated-teacher` (OpenAI),
the request's model name echoed back.

    config.py    TeacherKnobs (how it misbehaves, seeded) and TeacherConfig (where the gold is)
    wire.py      OpenAI / Anthropic bodies and SSE streams <-> neutral messages
    labeller.py  the sub-agent's policy (and how its paging survives pruned memory)
    text_answers.py  its answers for text kinds (generation, extraction): gold, seeded faults
    paging.py    reading its place in the slice back out of a conversation
    slips.py     its deliberate mistakes: prose, harmful SQL, arguments that are not JSON
    roles.py     judge (<review>), preference pairs (<pairs>), tuner (<tune>)
    text_roles.py  text kinds: rubric judge (<review> with a rubric), pairwise (<compare>)
    server.py    the FastAPI app: auth, faults, request log, stats; TeacherServer

    with TeacherServer(TeacherConfig(url, "articles", "id", "topic", labels)) as t:
        openai.OpenAI(base_url=t.base_url, api_key="k")        # t.base_url ends in /v1
        anthropic.Anthropic(base_url=t.url, api_key="k")       # t.url is the root

A text task: `TeacherConfig(url, "articles", "id", "headline", kind="generation")` (the gold
column holds the reference text; extraction: a JSON object as JSON text; no labels).
"""

from agents.teacher.config import TeacherConfig, TeacherKnobs
from agents.teacher.server import TeacherServer, create_app, serve_forever
from agents.teacher.wire import FINGERPRINT

__all__ = ["FINGERPRINT", "TeacherConfig", "TeacherKnobs", "TeacherServer", "create_app",
           "serve_forever"]

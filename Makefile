# posttrain: `make demo` runs the whole pipeline on the demo spec (`make demo-headlines`: the
# generation demo); `make test` runs the tests.
# Both create .venv if it is missing. torch==2.13.0 is installed first (a local CPU build on
# this machine) and constraints.txt keeps anything else from swapping it.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SPEC   ?= examples/news_topics/spec.yaml
OUT    ?= runs/demo
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: install demo demo-headlines screenshot test lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

examples/news_topics/warehouse.db: | $(BIN)/.installed
	$(BIN)/python examples/news_topics/build_warehouse.py

demo: install examples/news_topics/warehouse.db
	$(BIN)/posttrain run $(SPEC) --out $(OUT)

# the second demo: a generation task on the same warehouse (write the headline of an article)
demo-headlines: install examples/news_topics/warehouse.db
	$(BIN)/posttrain run examples/news_headlines/spec.yaml --out $(or $(HEADLINES_OUT),runs/headlines)

# the README's MLflow picture, from the demo's run (needs Debian's chromium)
screenshot: install
	$(BIN)/python docs/screenshots/mlflow_run.py --out $(OUT)

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs examples/news_topics/warehouse.db

# kubetune: generated files, images, chart. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON   ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
KUBETUNE ?= $(PYTHON) -m kubetune.cli
HELM     ?= $(if $(wildcard .tools/bin/helm),.tools/bin/helm,helm)
DOCKER   ?= docker

VERSION  ?= $(shell $(PYTHON) -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
REGISTRY ?= ghcr.io/kubetune
OPERATOR_IMAGE ?= $(REGISTRY)/operator
TRAINER_IMAGE  ?= $(REGISTRY)/trainer
PLATFORM ?= linux/amd64

# Where `generate` writes (overridable so a test can regenerate into a scratch folder).
CRD_DIR       ?= crds
DOCS_FILE     ?= docs/api.md
OPERATOR_DOC  ?= docs/operator.md
CHART_CRD_DIR ?= helm/kubetune/crds
CRD_FILE      := finetunejobs.kubetune.io.yaml
SWEEP_CRD_FILE := finetunesweeps.kubetune.io.yaml

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

.PHONY: generate
generate: ## regenerate every generated file: crds/, docs/api.md, docs/operator.md's conditions table, the chart's CRD copies
	@mkdir -p $(CRD_DIR) $(CHART_CRD_DIR) $(dir $(DOCS_FILE))
	$(KUBETUNE) crd > $(CRD_DIR)/$(CRD_FILE)
	$(KUBETUNE) docs > $(DOCS_FILE)
	$(KUBETUNE) docs --conditions-in docs/operator.md > $(OPERATOR_DOC).new
	mv $(OPERATOR_DOC).new $(OPERATOR_DOC)
	cp $(CRD_DIR)/$(CRD_FILE) $(CHART_CRD_DIR)/$(CRD_FILE)
	$(KUBETUNE) crd FineTuneSweep > $(CRD_DIR)/$(SWEEP_CRD_FILE)
	cp $(CRD_DIR)/$(SWEEP_CRD_FILE) $(CHART_CRD_DIR)/$(SWEEP_CRD_FILE)

.PHONY: pins
pins: ## pin the images' dependencies to the versions in this venv (operator/, trainer-image/constraints.txt)
	$(PYTHON) scripts/pin_image_deps.py

.PHONY: operator-image
operator-image: ## build the operator image (slim, no torch)
	$(DOCKER) build --platform $(PLATFORM) -f operator/Dockerfile -t $(OPERATOR_IMAGE):$(VERSION) .

.PHONY: trainer-image
trainer-image: ## build the trainer image (CUDA, torch, non-root)
	$(DOCKER) build --platform $(PLATFORM) -f trainer-image/Dockerfile -t $(TRAINER_IMAGE):$(VERSION) .

.PHONY: images
images: operator-image trainer-image ## build both images, tagged $(VERSION)

.PHONY: push
push: images ## push both images
	$(DOCKER) push $(OPERATOR_IMAGE):$(VERSION)
	$(DOCKER) push $(TRAINER_IMAGE):$(VERSION)

.PHONY: chart
chart: ## lint and package the Helm chart into dist/
	$(HELM) lint --strict helm/kubetune
	$(HELM) package helm/kubetune --version $(VERSION) --app-version $(VERSION) -d dist

.PHONY: test
test: ## the README's full test command (what CI runs)
	$(PYTHON) -m pytest tests/unit tests/integration tests/e2e -m "not real_model" -n auto --dist loadfile -q

.PHONY: test-fast
test-fast: ## the fast tier: every test not marked slow
	$(PYTHON) -m pytest -m "not slow" -n auto --dist loadfile -q

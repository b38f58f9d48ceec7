# The two commands of the README. Both start by running scripts/install.sh (idempotent:
# seconds once the Horovod wheel is cached).
NP ?= 2
PYTHON := .venv/bin/python
ARGS ?=

.PHONY: install train test bench doctor image

install:
	bash scripts/install.sh

train: install
	$(PYTHON) -m app.prepare data=shakespeare $(ARGS)
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
	  .venv/bin/horovodrun -np $(NP) -H localhost:$(NP) $(PYTHON) -m app.train experiment=shakespeare $(ARGS)

test: install
	bash scripts/test.sh

bench: install
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 $(PYTHON) -m app.bench $(ARGS)

doctor: install
	$(PYTHON) -m app.doctor

# The image built from the Dockerfile and run for real (docker, else podman); several minutes
# the first time: torch and the Horovod build happen inside the image's build stage.
image:
	bash scripts/container_test.sh

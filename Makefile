# idemsvc: the two commands of the README are `make run` (or `go run ./cmd/idemsvc`) and `make test`.
SHELL   := bash
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: run build test lint bench proofs container

run:
	$(GO) run ./cmd/idemsvc

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/idemsvc ./cmd/idemsvc
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/idembench ./cmd/idembench

# Both modules: the service and the Go client (its own module, standard library only).
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...
	cd clients/go && $(GO) vet ./... && $(GO) test -race -count=1 ./...

lint:
	test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (gofmt -l $$(git ls-files '*.go'); exit 1)
	$(GO) vet ./...
	cd clients/go && $(GO) vet ./...
	$(GO) test -count=1 ./api/...   # kin-openapi's validation of the spec, and its coverage of the contract

bench:
	bash scripts/bench.sh

# The long versions of the proofs (the short ones run in `make test`): linearizability, kill -9
# cycles, the rapid model, tenants, hostile input, a soak of minutes, then each fuzz target.
FUZZTIME ?= 60s
proofs:
	set -o pipefail; IDEMSVC_PROOFS=long $(GO) test -count=1 -timeout 60m -v ./internal/proofs/... 2>&1 | tee proofs.log \
	  | grep -E '^(--- |ok|FAIL)|(linearizability|crash|soak|model|tenants|hostile): '
	$(GO) test -run '^$$' -fuzz '^FuzzHandler$$' -fuzztime $(FUZZTIME) ./internal/server/
	$(GO) test -run '^$$' -fuzz '^FuzzRequestBody$$' -fuzztime $(FUZZTIME) ./internal/server/
	$(GO) test -run '^$$' -fuzz '^FuzzValidateKey$$' -fuzztime $(FUZZTIME) ./internal/keys/
	$(GO) test -run '^$$' -fuzz '^FuzzStorageID$$' -fuzztime $(FUZZTIME) ./internal/keys/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeRecord$$' -fuzztime $(FUZZTIME) ./internal/keys/

container:
	bash ../shared/tools/container-smoke.sh .

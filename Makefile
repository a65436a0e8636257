# idemsvc: the two commands of the README are `make run` (or `go run ./cmd/idemsvc`) and `make test`.
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: run build test test-short lint bench proofs container

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
	$(GO) test -count=1 -run 'TestSpec' ./api/...

bench:
	bash scripts/bench.sh

container:
	bash ../shared/tools/container-smoke.sh .

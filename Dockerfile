# syntax=docker/dockerfile:1
# Build: a static binary, version stamped.
FROM golang:1.26-bookworm AS build
WORKDIR /src
ENV CGO_ENABLED=0 GOFLAGS=-buildvcs=false
COPY go.mod go.sum ./
COPY clients/go/go.mod clients/go/
RUN go mod download
COPY . .
ARG VERSION=dev
RUN go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/idemsvc ./cmd/idemsvc \
 && mkdir -p /out/data

# Run: distroless, non-root; /data is owned by the non-root user so a fresh named volume is writable.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/idemsvc /usr/local/bin/idemsvc
COPY --from=build --chown=65532:65532 /out/data /data
ENV IDEMSVC_DATA_DIR=/data IDEMSVC_ADDR=:8080
VOLUME /data
EXPOSE 8080
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/usr/local/bin/idemsvc", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/idemsvc"]

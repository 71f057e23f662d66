# A small, non-root image with the one `mailferry` binary (coordinator, worker, CLI).
#   docker build -t mailferry:0.1.0 .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mailferry-coordinator \
    && install -D -m 0755 target/release/mailferry /out/mailferry

# The binary links glibc only (TLS is rustls with webpki roots built in).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mailferry /usr/local/bin/mailferry
USER 10001:10001
EXPOSE 9464 8080
ENTRYPOINT ["/usr/local/bin/mailferry"]
CMD ["worker", "--config", "/etc/mailferry/mailferry.toml"]

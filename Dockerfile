# rapidin server image (Debian 12). Build: docker build -t rapidin .
# For GPU nodes build FROM an nvidia/cuda devel image of CUDA 13 and set RAPIDIN_ENABLE_CUDA=ON: scoring runs on the
# GPUs. Debian's LibTorch is CPU-only, so gradients (--model-device auto) stay on the CPU unless rapidin is built
# against a CUDA LibTorch (TORCH_PREFIX in scripts/configure.sh; README, "GPU").
FROM debian:12 AS build
RUN apt-get update && apt-get install -y --no-install-recommends sudo && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG RAPIDIN_ENABLE_CUDA=OFF
RUN RAPIDIN_ENABLE_CUDA=${RAPIDIN_ENABLE_CUDA} bash scripts/setup.sh -DRAPIDIN_BUILD_TESTS=OFF -DRAPIDIN_BUILD_BENCH=OFF \
 && cmake --install build --prefix /opt/rapidin

FROM debian:12
# Runtime libraries only (the -dev packages pull them in at build time).
RUN apt-get update && apt-get install -y --no-install-recommends \
      libgrpc++1.51 libprotobuf32 librocksdb7.8 libprometheus-cpp-core1.0 libspdlog1.10 libcpp-httplib0.11 \
      libtorch1.13 libopenblas0-pthread ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/rapidin /opt/rapidin
ENV PATH=/opt/rapidin/bin:$PATH
EXPOSE 50051 9464
VOLUME /data
# Kubernetes `args` replace CMD (deploy/rapidin.yaml: one store; deploy/rapidin-sharded.yaml: shard servers and a
# router); `command: [rapidin]` runs the CLI (caching jobs).
ENTRYPOINT ["rapidin-server"]
CMD ["--store", "/data/store", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]

# The base image, built without any registry: an empty image plus a Debian
# bookworm root filesystem made by `debootstrap --variant=minbase` and trimmed
# (scripts/docker.sh makes and caches rootfs.tar.gz, then builds this once).
# It has glibc, libstdc++ and /bin/sh, which our binaries and the worker's
# shell handler need. With a registry, `debian:bookworm-slim` is equivalent
# (see docker/Dockerfile, BASE_IMAGE).
FROM scratch
ADD rootfs.tar.gz /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["/bin/bash"]

#!/bin/sh
# Entry point of the client image.
#
# As the image's non-root user (the `client` service) it simply runs the command.
#
# As root (the one-shot `prepare` and `evaluate` services, see compose.yaml) it
# runs the command and then hands what it wrote back to the right owners:
#   - new files in a writable bind mount (/data, /reports) go to the owner of
#     that host folder, so a user on a normal Linux machine can read and delete
#     them without sudo, and they are made world-readable so the non-root
#     services (which mount ./data read-only) can read the MNIST files;
#   - the tokens (/run/secrets/fedsim) and SECAGG's workers' secret
#     (/run/secrets/fedsim-workers) go to the image's user with mode 0600:
#     the services run as that user (UID 10001 in both images) and read them,
#     and nobody else on the host can (they are written 0600 from the start);
#   - /models (the named volume) goes to the image's user, so the non-root
#     aggregator can add checkpoints next to version 0 and delete old ones.
# Root is needed only because ./data and ./reports are bind mounts owned by
# whoever cloned the project, whose UID the image cannot know in advance.
set -u

if [ "$(id -u)" != 0 ]; then
  exec "$@"
fi

"$@"
status=$?

for dir in /data /reports; do
  # Skip a folder that is not mounted or is mounted read-only.
  [ -d "$dir" ] && [ -w "$dir" ] || continue
  owner=$(stat -c %u:%g "$dir")
  find "$dir" -mindepth 1 -user 0 -exec chown "$owner" {} + 2>/dev/null
  find "$dir" -mindepth 1 -exec chmod a+rX {} + 2>/dev/null
done
for dir in /run/secrets/fedsim /run/secrets/fedsim-workers; do
  [ -d "$dir" ] && [ -w "$dir" ] || continue
  find "$dir" -mindepth 1 -type f -exec chown fedsim:fedsim {} + \
    -exec chmod 0600 {} + 2>/dev/null
done
if [ -d /models ] && [ -w /models ]; then
  chown -R fedsim:fedsim /models
fi

exit "$status"

#!/bin/sh
# Entry point of the client image.
#
# As the image's non-root user (the `client` service) it simply runs the command.
#
# As root (the one-shot `prepare` and `evaluate` services, see compose.yaml) it
# runs the command and then hands what it wrote back to the right owners:
#   - new files in a writable bind mount (/data, /reports, /run/secrets/fedsim)
#     go to the owner of that host folder, so a user on a normal Linux machine
#     can read and delete them without sudo, and they are made world-readable so
#     the non-root services (which mount ./data and ./secrets read-only) can
#     read downloaded MNIST files and the tokens;
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

for dir in /data /reports /run/secrets/fedsim; do
  # Skip a folder that is not mounted or is mounted read-only.
  [ -d "$dir" ] && [ -w "$dir" ] || continue
  owner=$(stat -c %u:%g "$dir")
  find "$dir" -mindepth 1 -user 0 -exec chown "$owner" {} + 2>/dev/null
  find "$dir" -mindepth 1 -exec chmod a+rX {} + 2>/dev/null
done
if [ -d /models ] && [ -w /models ]; then
  chown -R fedsim:fedsim /models
fi

exit "$status"

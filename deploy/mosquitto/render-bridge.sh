#!/bin/sh
# Print deploy/mosquitto/site-bridge.conf for one site of one fleet.
#
#   deploy/mosquitto/render-bridge.sh FLEET SITE CLOUD_HOST:PORT
#
# FLEET and SITE must be DAI names (1-64 characters of [A-Za-z0-9._-]),
# and CLOUD_HOST:PORT a host name or address and a port, so nothing can
# carry an MQTT wildcard, a topic separator or a sed metacharacter into
# the file.
set -eu
if [ $# -ne 3 ]; then
    echo "usage: $0 FLEET SITE CLOUD_HOST:PORT" >&2
    exit 64
fi
for name in "$1" "$2"; do
    case $name in
        '' | *[!A-Za-z0-9._-]*) bad=1 ;;
        *) bad=0 ;;
    esac
    if [ "$bad" = 1 ] || [ ${#name} -gt 64 ]; then
        echo "$0: name $name: expected 1-64 characters of [A-Za-z0-9._-]" >&2
        exit 64
    fi
done
case $3 in
    *[!A-Za-z0-9.:-]* | :* | *: | '') bad=1 ;;
    *:*) bad=0 ;;
    *) bad=1 ;;
esac
if [ "$bad" = 1 ]; then
    echo "$0: cloud address $3: expected HOST:PORT" >&2
    exit 64
fi
sed -e "s/@FLEET@/$1/g" -e "s/@SITE@/$2/g" -e "s/@CLOUD@/$3/g" "$(dirname "$0")/site-bridge.conf"

#!/bin/sh
# Runs once when the VM boots, before it answers the readiness handshake.
# A non-zero exit fails the boot.
set -eu
mkdir -p home tmp
echo "booted $MURMUR_VM_ID from image $MURMUR_IMAGE" > etc/murmur/boot.log

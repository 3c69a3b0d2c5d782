#!/usr/bin/env bash
# Build the QEMU guest of the end-to-end suite from Debian packages: the
# kernel of `linux-image-amd64` (downloaded and unpacked with
# `apt-get download` + `dpkg-deb -x`, never installed) and a busybox
# initramfs whose init loads virtio-net, takes its address from the kernel
# command line (`dvs.ip=10.0.0.5/24`) and serves a TCP echo on port 7 and
# HTTP on port 80.
#
#   tests/qemu/build-guest.sh DIR     # writes DIR/vmlinuz and DIR/initramfs.gz
#
# Needs busybox-static and cpio (scripts/test installs them). Idempotent:
# a DIR that has both files is left alone.
set -euo pipefail
out=${1:?usage: build-guest.sh DIR}
mkdir -p "$out"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ]; then
  exit 0
fi
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "build-guest.sh: $busybox missing: install busybox-static" >&2; exit 1; }
"$busybox" --list | grep -qx nc || { echo "build-guest.sh: $busybox has no nc applet: install busybox-static" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$pkg" ] || { echo "build-guest.sh: apt-cache knows no linux-image-amd64 (run apt-get update)" >&2; exit 1; }
(cd "$work" && apt-get download -qq "$pkg" 2>/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
kver=$(ls "$work/k/lib/modules")
root="$work/root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,modules,www}
cp "$busybox" "$root/bin/busybox"
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/core/failover \
         drivers/net/net_failover drivers/net/virtio_net; do
  f=$(ls "$work/k/lib/modules/$kver/kernel/$m".ko* | head -1)
  case "$f" in
    *.xz) xz -dc "$f" > "$root/modules/$(basename "$m").ko" ;;
    *.zst) zstd -dqc "$f" > "$root/modules/$(basename "$m").ko" ;;
    *) cp "$f" "$root/modules/$(basename "$m").ko" ;;
  esac
done
echo "dvs guest" > "$root/www/index.html"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  insmod /modules/$m.ko
done
ip=$(sed -n 's/.*dvs\.ip=\([^ ]*\).*/\1/p' /proc/cmdline)
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
ip link set lo up
ip link set eth0 up
ip addr add "$ip" dev eth0
httpd -h /www -p 80
# A TCP echo on port 7: every connection gets its own cat.
nc -ll -p 7 -e cat &
echo "dvs-guest: up at $ip"
while true; do sleep 3600; done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.gz.tmp"
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "build-guest.sh: guest kernel $kver and initramfs in $out" >&2

#!/usr/bin/python3
"""Start QEMU on a TAP the way libvirt does for <interface type='ethernet'>.

    tap-launch.py TAP GO -- QEMU-ARGV...

Creates the TAP (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, not persistent) in
the caller's network namespace and sets it up, as libvirt's
qemuInterfaceEthernetConnect does before `start begin`; prints "tap ready";
waits until the file GO exists (the test runs the `start begin` hook
meanwhile); then execs QEMU with the TAP's fd ("{fd}" in QEMU-ARGV is
replaced by its number). The TAP goes away when QEMU exits, as libvirt's
does.
"""
import fcntl
import os
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000

name, go = sys.argv[1], sys.argv[2]
argv = sys.argv[sys.argv.index("--") + 1:]
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
subprocess.run(["ip", "link", "set", name, "up"], check=True)
print("tap ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
os.set_inheritable(fd, True)
os.execvp(argv[0], [a.replace("{fd}", str(fd)) for a in argv])

#!/bin/sh
# banger's first-slice init: runs as PID 1 from the initramfs, under busybox.
#
# It loads the virtio modules, mounts the root disk, runs the requested command chrooted
# into it, prints BANGER_EXIT=<status> on the console and reboots (QEMU runs with
# -no-reboot, so the reboot ends the VM). PID 1 stays ours rather than switch_root'ing
# into the image: the image need not contain a shell that reaps children or knows how to
# power off, and the exit status must outlive the command.
#
# Kernel command line parameters it reads:
#   banger.probe=1        print BANGER_PROBE_OK and reboot at once (KVM probe)
#   banger.root=/dev/vda  root block device (ext4)
#   banger.agent=1        switch_root into the image and exec /.banger/agent as PID 1
#   banger.cmd=BASE64     the command, run with /bin/sh -c inside the root; base64 because
#                         the kernel command line has no reliable quoting
export PATH=/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

arg() {
    for kv in $(cat /proc/cmdline); do
        case "$kv" in "$1="*) echo "${kv#*=}"; return ;; esac
    done
}
finish() {
    echo
    echo "BANGER_EXIT=$1"
    sync
    reboot -f
    sleep 10
}

if [ -n "$(arg banger.probe)" ]; then
    echo BANGER_PROBE_OK
    reboot -f
fi

# A kernel imported without modules has virtio, ext4 and vsock built in: its load list is
# empty. A listed module missing from the initramfs is skipped, not fatal: the root
# device wait below says clearly whether the kernel can see the disk without it.
[ -f /etc/banger/modules.load ] && while read -r m; do
    [ -n "$m" ] || continue
    if [ ! -f "/lib/modules/$m.ko" ]; then
        echo "banger-init: module $m is not in the initramfs; assuming it is built in"
        continue
    fi
    insmod "/lib/modules/$m.ko" || echo "banger-init: insmod $m failed"
done < /etc/banger/modules.load

root=$(arg banger.root)
root=${root:-/dev/vda}
# The virtio-blk probe runs asynchronously after insmod returns.
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    if [ $i -gt 1000 ]; then
        echo "banger-init: root device $root did not appear"
        finish 255
    fi
    sleep 0.01
done
mount -t ext4 "$root" /newroot || { echo "banger-init: mount $root failed"; finish 255; }
if [ -n "$(arg banger.agent)" ]; then
    # The VM is a long-lived sandbox: hand PID 1 to banger's agent inside the image.
    # The agent comes in the initramfs (a second archive banger appends), so the image
    # stays read-only on the host: it lands in the VM's own (copy-on-write) root.
    if [ -f /banger/agent ]; then
        mkdir -p /newroot/.banger
        cp /banger/agent /newroot/.banger/agent.new &&
            chmod 0755 /newroot/.banger/agent.new &&
            mv -f /newroot/.banger/agent.new /newroot/.banger/agent ||
            echo "banger-init: installing the agent into the root failed"
    fi
    umount -l /dev /sys /proc
    exec switch_root /newroot /.banger/agent
    echo "banger-init: switch_root to /.banger/agent failed"
    finish 255
fi
for d in proc sys dev; do mkdir -p "/newroot/$d"; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev

cmd=$(arg banger.cmd | base64 -d)
status=0
if [ -n "$cmd" ]; then
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        chroot /newroot /bin/sh -c "$cmd" < /dev/console
    status=$?
fi
umount /newroot/dev /newroot/sys /newroot/proc
umount /newroot || mount -o remount,ro /newroot
finish $status

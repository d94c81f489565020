#!/bin/sh
# /init of the kernel-client test guest (busybox ash). It drives the kernel's
# NBD client against splitd on the host (10.0.2.2) and reports on the serial
# console with lines that start with "@@":
#   @@BOOT release          /init started
#   @@STEP name uptime      a step begins
#   @@FAIL step: why        a check failed (the run goes on where it can)
#   @@INFO key value...     a figure the host checks (limits, counters)
#   @@SUM export off len sha256   what the guest wrote (checked on the host)
#   @@DEVSUM export sha256  the whole export, once detached
#   @@SPLIT-NOW n           the host splits the pair now; n files are durable
#   @@KERNEL line           an NBD/block/ext4 error in the kernel log
#   @@DONE failures         the end; then the guest powers off
# Settings come from /etc/params (written by the test). Tools that busybox also
# has are called by full path (/host/...): busybox's shell prefers its applets.
export PATH=/bin:/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
ln -sf /proc/mounts /etc/mtab
echo "@@BOOT $(uname -r)"
. /etc/params
DD=/host/bin/dd
FAILS=0
STEP=boot

say() { echo "@@$*"; }
fail() { FAILS=$((FAILS + 1)); say "FAIL $STEP: $*"; }
step() { STEP=$1; say "STEP $1 $(cut -d' ' -f1 /proc/uptime)"; }
finish() {
    step kernel-log
    dmesg > /tmp/dmesg.txt
    grep -E 'Other side returned error|I/O error|blk_update_request|Buffer I/O|EXT4-fs error|EXT4-fs warning|nbd[0-9]+: (Receive|Send|Dead|Unexpected|Double|Attempted|Connection timed)|Call Trace|BUG:|WARNING:' \
        /tmp/dmesg.txt | while IFS= read -r line; do say "KERNEL $line"; done
    say "DONE $FAILS"
    sync
    poweroff -f
    sleep 60
}
# die: a failure after which nothing further makes sense.
die() { fail "$*"; finish; }

# Busybox's dd (static: far cheaper to start under TCG than the host's) for
# everything but O_DSYNC writes, which only the host's dd can make.
# sha FILE OFF LEN [iflag]: SHA= the sha256 of LEN bytes of FILE at byte OFF,
# read in one request of LEN bytes.
sha() {
    SHA=$(dd if="$1" bs="$3" count=1 skip="$2" iflag=skip_bytes${4:+,$4} 2> /dev/null | sha256sum)
    SHA=${SHA%% *}
}
# pat_sha POS LEN: SHA= the sha256 of LEN bytes of the pattern at POS.
pat_sha() { sha /tmp/pat "$1" "$2"; }
zero_sha() { SHA=$(head -c "$1" /dev/zero | sha256sum); SHA=${SHA%% *}; }

# wr DEV OFF LEN POS [direct|dsync]: write LEN bytes of the pattern from POS at OFF.
wr() {
    if [ "$5" = dsync ]; then
        $DD if=/tmp/pat of="$1" bs="$3" count=1 skip="$4" seek="$2" iflag=skip_bytes \
            oflag=seek_bytes,direct,dsync conv=notrunc status=none
    else
        dd if=/tmp/pat of="$1" bs="$3" count=1 skip="$4" seek="$2" iflag=skip_bytes \
            oflag=seek_bytes${5:+,$5} conv=notrunc 2> /dev/null
    fi || fail "write $3 at $2 (${5:-buffered}): dd failed"
}
# chk DEV OFF LEN expected-sha [direct] [what]
chk() {
    sha "$1" "$2" "$3" "$5"
    [ "$SHA" = "$4" ] || fail "${6:-read} $3 at $2 (${5:-buffered}): sha $SHA, expected $4"
}
# wrchk DEV OFF LEN POS wflag rflag: write, read back, compare; record in raw.sums.
wrchk() {
    wr "$1" "$2" "$3" "$4" "$5"
    pat_sha "$4" "$3"; want=$SHA
    [ -z "$6" ] && blockdev --flushbufs "$1" && echo 3 > /proc/sys/vm/drop_caches
    chk "$1" "$2" "$3" "$want" "$6"
    echo "$2 $3 $want" >> /tmp/raw.sums
}
stat_of() { cat /sys/block/$1/stat; }
# field "LINE" N: the Nth whitespace-separated field of LINE
field() { n=$2; set -- $1; eval echo "\${$n}"; }

attach() {  # attach DEV EXPORT extra nbd-client args...
    dev=$1; exp=$2; shift 2
    timeout 60 /sbin/nbd-client 10.0.2.2 "$PORT" "/dev/$dev" -N "$exp" "$@" \
        > /tmp/nbd-client.out 2>&1 || { cat /tmp/nbd-client.out; return 1; }
    # wait for the size to show (the ioctl path sets it from a child process)
    n=0
    while [ "$(cat /sys/block/$dev/size)" = 0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    [ "$(cat /sys/block/$dev/size)" != 0 ]
}
detach() { /sbin/nbd-client -d "/dev/$1" > /dev/null 2>&1 || fail "nbd-client -d /dev/$1"; }

limits() {  # report the queue limits of DEV; raise max_sectors_kb to the hardware max
    q=/sys/block/$1/queue
    cat $q/max_hw_sectors_kb > $q/max_sectors_kb || fail "cannot raise max_sectors_kb"
    for f in logical_block_size max_hw_sectors_kb max_sectors_kb discard_granularity \
             discard_max_bytes write_zeroes_max_bytes nr_requests write_cache fua; do
        [ -e $q/$f ] && say "INFO $2 $f $(cat $q/$f)"
    done
    say "INFO $2 hw_queues $(ls /sys/block/$1/mq | wc -l)"
    say "INFO $2 size $(($(cat /sys/block/$1/size) * 512))"
}

# ---------------------------------------------------------------------------
step setup
while read -r m; do
    insmod /modules/$m.ko || die "insmod $m"
done < /modules/order
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
# No default route: only 10.0.2.0/24 is reachable, and only 10.0.2.2 (the
# host's loopback) is used.
ip route | grep -q default && die "a default route exists"
mkdir -p /mnt/fs /mnt/sec
# The pattern every write takes its data from; 8 MiB more than the largest request.
dd if=/dev/urandom of=/tmp/pat bs=1M count=$((32 + 8)) 2> /dev/null || die "no pattern"
: > /tmp/raw.sums

# ---------------------------------------------------------------------------
step raw-attach-netlink
attach nbd0 "$RAW" -C 2 -b 512 || die "nbd-client (netlink, -C 2, -b 512) failed"
limits nbd0 raw
D=/dev/nbd0
MAX=$(($(cat /sys/block/nbd0/queue/max_sectors_kb) * 1024))
[ $MAX -gt $((32 << 20)) ] && MAX=$((32 << 20))

step raw-sizes
# One region per size and kind, at 512-byte but not 4096-byte aligned offsets:
# O_DIRECT, O_DIRECT|O_DSYNC (FUA), and buffered (written back, caches dropped).
i=0
for len in 512 1024 1536 4096 8192 65536 131072 1048576 4194304 $MAX; do
    base=$((i * 256 << 20))
    pos=$(( (i * 4096 + 512) % (8 << 20) ))
    wrchk $D $((base + 512 * (i % 7 + 1))) $len $pos direct direct
    wrchk $D $((base + (64 << 20) + 512 * (i % 5 + 1))) $len $((pos + 512)) dsync direct
    wrchk $D $((base + (128 << 20) + 512 * (i % 3 + 1))) $len $((pos + 1024)) "" ""
    i=$((i + 1))
done

step raw-max-request
# One O_DIRECT request of the device's maximum must reach the server as one.
off=$((3 << 30))
before=$(stat_of nbd0)
dd if=/tmp/pat of=$D bs=$MAX count=1 seek=$off oflag=seek_bytes,direct 2> /dev/null || fail "max write"
mid=$(stat_of nbd0)
dd if=$D of=/dev/null bs=$MAX count=1 skip=$off iflag=skip_bytes,direct 2> /dev/null || fail "max read"
after=$(stat_of nbd0)
say "INFO raw max_request $MAX write_ios $(($(field "$mid" 5) - $(field "$before" 5))) read_ios $(($(field "$after" 1) - $(field "$mid" 1)))"
pat_sha 0 $MAX; echo "$off $MAX $SHA" >> /tmp/raw.sums

step raw-parallel
# Many processes at once, O_DIRECT and buffered, so that far more requests are
# in flight than the daemon's per-connection cap; the in-flight count is sampled.
rm -f /tmp/par.stop
echo 0 > /tmp/par.max
( m=0; while [ ! -e /tmp/par.stop ]; do
      read r w < /sys/block/nbd0/inflight
      [ $((r + w)) -gt $m ] && m=$((r + w)) && echo $m > /tmp/par.max
      usleep 5000
  done ) &
sampler=$!
pids=""
p=0
while [ $p -lt $PAR ]; do
    (
        base=$(( (4 << 30) + p * (16 << 20) ))
        j=0
        for len in 4096 65536 512 1048576 131072 $((1536 + 512 * (p % 4))); do
            off=$((base + j * (2 << 20) + 512 * (p % 8)))
            pos=$(( (p * 65536 + j * 4096) % (8 << 20) ))
            if [ $((p % 4)) = 3 ]; then
                wr $D $off $len $pos ""      # buffered: writeback batches these
            else
                wr $D $off $len $pos direct
            fi
            pat_sha $pos $len
            echo "$off $len $SHA" >> /tmp/par.$p
            j=$((j + 1))
        done
        [ $((p % 4)) = 3 ] && sync
        while read -r off len want; do
            chk $D $off $len $want direct
        done < /tmp/par.$p
        echo $FAILS > /tmp/par.$p.fails
    ) &
    pids="$pids $!"
    p=$((p + 1))
done
for pid in $pids; do wait $pid; done
touch /tmp/par.stop
wait $sampler
say "INFO raw max_inflight $(cat /tmp/par.max)"
p=0
while [ $p -lt $PAR ]; do
    [ "$(cat /tmp/par.$p.fails 2> /dev/null)" = "$FAILS" ] || FAILS=$((FAILS + 1))
    cat /tmp/par.$p >> /tmp/raw.sums
    p=$((p + 1))
done

step raw-discard
M1=1048576
zero_sha $M1; Z=$SHA
# A discard of several GiB, with data just outside it and inside it.
A=$((16 << 30)); L=$((6 << 30))
for o in $((A - M1)) $A $((A + L / 2)) $((A + L - M1)) $((A + L)); do
    wr $D $o $M1 $((o % (4 << 20))) direct
done
out=$(/host/sbin/blkdiscard -o $A -l $L $D 2>&1) || fail "blkdiscard $L at $A: $out"
for o in $((A - M1)) $((A + L)); do
    pat_sha $((o % (4 << 20))) $M1
    chk $D $o $M1 $SHA direct "next to the discard"
    echo "$o $M1 $SHA" >> /tmp/raw.sums
done
for o in $A $((A + L / 2)) $((A + L - M1)); do
    chk $D $o $M1 $Z direct "discarded"
    echo "$o $M1 $Z" >> /tmp/raw.sums
done
# A small one at the device's granularity: 3 sectors inside 64 KiB of data.
B=$((24 << 30)); K64=65536
wr $D $B $K64 4096 direct
/host/sbin/blkdiscard -o $((B + 512)) -l 1536 $D || fail "blkdiscard 1536 at $((B + 512))"
pat_sha 4096 512; chk $D $B 512 $SHA direct "before the small discard"
zero_sha 1536; chk $D $((B + 512)) 1536 $SHA direct "small discard"
pat_sha 6144 $((K64 - 2048)); chk $D $((B + 2048)) $((K64 - 2048)) $SHA direct "after the small discard"
sha $D $B $K64 direct; echo "$B $K64 $SHA" >> /tmp/raw.sums

step raw-zeroout
# blkdiscard -z: WRITE_ZEROES where the driver sends it (6.x), written zeroes otherwise.
C=$((25 << 30)); Z4=$((4 << 20)); Z8=$((8 << 20))
wr $D $C $Z8 0 direct
/host/sbin/blkdiscard -z -o $((C + 512)) -l $Z4 $D || fail "blkdiscard -z $Z4 at $((C + 512))"
pat_sha 0 512; chk $D $C 512 $SHA direct "before the zeroed range"
zero_sha $Z4; chk $D $((C + 512)) $Z4 $SHA direct "zeroed"
pat_sha $((Z4 + 512)) $((Z8 - Z4 - 512))
chk $D $((C + 512 + Z4)) $((Z8 - Z4 - 512)) $SHA direct "after the zeroed range"
sha $D $C $Z8 direct; echo "$C $Z8 $SHA" >> /tmp/raw.sums
if [ "$(cat /sys/block/nbd0/queue/write_zeroes_max_bytes)" != 0 ]; then
    # A large one too, where it is one command.
    G=$((26 << 30)); G256=$((256 << 20))
    wr $D $((G + G256)) $M1 0 direct
    wr $D $((G + G256 - M1)) $M1 0 direct
    /host/sbin/blkdiscard -z -o $G -l $G256 $D || fail "blkdiscard -z 256 MiB"
    chk $D $((G + G256 - M1)) $M1 $Z direct "zeroed (large)"
    pat_sha 0 $M1; chk $D $((G + G256)) $M1 $SHA direct "after the zeroed range (large)"
    echo "$((G + G256 - M1)) $M1 $Z" >> /tmp/raw.sums
    echo "$((G + G256)) $M1 $SHA" >> /tmp/raw.sums
fi
blockdev --flushbufs $D || fail "flush"
detach nbd0

# ---------------------------------------------------------------------------
step raw-attach-ioctl
attach nbd1 "$RAW" -L -C 2 -b 4096 || die "nbd-client (ioctl, -C 2, -b 4096) failed"
limits nbd1 raw-ioctl
D=/dev/nbd1
step raw-reread
# What the first attachment wrote, read back through this one (buffered: the
# offsets are not all 4096-aligned); every third region, and all large ones.
n=0
while read -r off len want; do
    [ $((n % 3)) = 0 ] || [ $len -ge 1048576 ] && chk $D $off $len $want "" "reread"
    n=$((n + 1))
done < /tmp/raw.sums
step raw-ioctl-writes
pids=""
p=0
while [ $p -lt $PAR ]; do
    (
        off=$(( (30 << 30) + p * (4 << 20) )); len=$(( 4096 << (p % 9) ))
        wr $D $off $len $((p * 4096)) direct
        pat_sha $((p * 4096)) $len
        chk $D $off $len $SHA direct
        echo "$off $len $SHA" > /tmp/io.$p
        echo $FAILS > /tmp/io.$p.fails
    ) &
    pids="$pids $!"
    p=$((p + 1))
done
for pid in $pids; do wait $pid; done
p=0
while [ $p -lt $PAR ]; do
    [ "$(cat /tmp/io.$p.fails 2> /dev/null)" = "$FAILS" ] || FAILS=$((FAILS + 1))
    cat /tmp/io.$p >> /tmp/raw.sums
    p=$((p + 1))
done
blockdev --flushbufs $D || fail "flush"
detach nbd1
while read -r off len want; do say "SUM $RAW $off $len $want"; done < /tmp/raw.sums

# ---------------------------------------------------------------------------
step fs-attach
attach nbd2 "$FS" -C 2 -b 4096 || die "nbd-client $FS (netlink, -C 2, -b 4096) failed"
limits nbd2 fs
P=/dev/nbd2
step fs-mkfs
out=$(/host/sbin/mke2fs -t ext4 -F -q $P 2>&1) || die "mke2fs: $out"
mount -t ext4 $P /mnt/fs || die "mount $P"
step fs-files
mkdir -p /mnt/fs/small /mnt/fs/big /mnt/fs/live
tar -xf /data/small.tar -C /mnt/fs/small || fail "tar x"
for n in 1 2 3; do
    dd if=/dev/urandom of=/mnt/fs/big/$n bs=1M count=$BIG_MB 2> /dev/null || fail "big file $n"
done
sync
say "INFO fs files $(find /mnt/fs -type f | wc -l)"
step fs-trim
# Free some blocks (a fifth of the small files, one large file), then fstrim.
find /mnt/fs/small -type f -name '*[05]' | xargs rm -f
rm -f /mnt/fs/big/2
sync
out=$(/host/sbin/fstrim -v /mnt/fs 2>&1) || fail "fstrim: $out"
say "INFO fs fstrim $out"
step fs-sums
(cd /mnt/fs && find . -type f | sort | xargs sha256sum) > /tmp/fs.sums
say "INFO fs summed $(wc -l < /tmp/fs.sums)"
umount /mnt/fs || die "umount"
out=$(/host/sbin/e2fsck -n -f $P 2>&1) || fail "e2fsck -n -f (after fstrim): $out"
mount -t ext4 $P /mnt/fs || die "remount"
(cd /mnt/fs && sha256sum -c -s /tmp/fs.sums) || fail "checksums after remount"

# ---------------------------------------------------------------------------
step split
# A writer makes files (fsync, rename, sync) while the host splits the pair.
rm -f /tmp/stop
: > /tmp/live.done
(
    i=0
    while [ ! -e /tmp/stop ]; do
        len=$(( (i % 16 + 1) * 65536 )); pos=$(( (i * 4096) % (16 << 20) ))
        dd if=/tmp/pat of=/mnt/fs/live/tmp.$i bs=$len count=1 skip=$pos iflag=skip_bytes \
            conv=fsync 2> /dev/null || { echo "@@FAIL split: writer dd $i"; break; }
        mv /mnt/fs/live/tmp.$i /mnt/fs/live/f.$i
        echo "$i $len $pos" >> /mnt/fs/live/log   # never synced on its own
        sync
        echo "$i $len $pos" >> /tmp/live.done
        i=$((i + 1))
    done
) &
writer=$!
n=0
while [ "$(wc -l < /tmp/live.done)" -lt 10 ] && [ $n -lt 600 ]; do usleep 100000; n=$((n + 1)); done
durable=$(wc -l < /tmp/live.done)
[ "$durable" -ge 10 ] || fail "the writer wrote only $durable files in a minute"
say "SPLIT-NOW $durable"
# The secondary's export is refused until the split: keep trying.
n=0
until /sbin/nbd-client 10.0.2.2 "$PORT" /dev/nbd3 -N "$SEC" -b 4096 > /tmp/sec.out 2>&1; do
    n=$((n + 1))
    [ $n -ge 240 ] && { cat /tmp/sec.out; die "secondary $SEC never attached"; }
    usleep 500000
done
say "INFO split attach_tries $n"
sleep 2    # the writer goes on after the split
touch /tmp/stop
wait $writer
say "INFO split written $(wc -l < /tmp/live.done)"
step split-secondary
S=/dev/nbd3
mount -t ext4 $S /mnt/sec || die "mount the secondary"
dmesg | grep -q 'EXT4-fs (nbd3): recovery complete' && say "INFO split journal_replayed 1" \
    || say "INFO split journal_replayed 0"
(cd /mnt/sec && sha256sum -c -s /tmp/fs.sums) || fail "static files differ on the secondary"
present=0; last=-1
while read -r i len pos; do
    pat_sha $pos $len; want=$SHA
    if [ -e /mnt/sec/live/f.$i ]; then
        present=$((present + 1)); last=$i
        got=$(sha256sum < /mnt/sec/live/f.$i); got=${got%% *}
        [ "$got" = "$want" ] || fail "secondary live/f.$i: sha $got, expected $want"
    elif [ $i -lt $durable ]; then
        fail "secondary live/f.$i is missing: it was durable before the split"
    fi
done < /tmp/live.done
say "INFO split secondary_files $present durable $durable"
# The writer finished its files one after the other: a point-in-time image
# holds the first ones, with no gap.
[ $present = $((last + 1)) ] || fail "the secondary holds $present files, the last f.$last: a gap"
for f in /mnt/sec/live/f.*; do
    i=${f##*/f.}
    grep -q "^$i " /tmp/live.done || fail "secondary has live/f.$i, which the writer never finished"
done
umount /mnt/sec || fail "umount the secondary"
out=$(/host/sbin/e2fsck -n -f $S 2>&1) || fail "e2fsck -n -f (secondary): $out"

step fs-final
(cd /mnt/fs && sha256sum -c -s /tmp/fs.sums) || fail "static files differ on the primary"
while read -r i len pos; do
    got=$(sha256sum < /mnt/fs/live/f.$i); got=${got%% *}
    pat_sha $pos $len
    [ "$got" = "$SHA" ] || fail "primary live/f.$i differs"
done < /tmp/live.done
umount /mnt/fs || fail "umount the primary"
out=$(/host/sbin/e2fsck -n -f $P 2>&1) || fail "e2fsck -n -f (primary): $out"
step devsum
for pair in "$FS $P" "$SEC $S"; do
    set -- $pair
    SHA=$(dd if=$2 bs=4M iflag=direct 2> /dev/null | sha256sum)
    say "DEVSUM $1 ${SHA%% *}"
done
detach nbd2
detach nbd3
finish

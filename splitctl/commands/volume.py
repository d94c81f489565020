"""splitctl volume create | list | show | resize | delete."""
from __future__ import annotations

from argparse import Namespace
from typing import Any

from common.names import DEFAULT_REGION_SIZE
from splitctl import args as types
from splitctl.args import Commands
from splitctl.client import AdminClient
from splitctl.output import format_size, print_fields, print_table

NAME_HELP = ("volume name: 1 to 64 letters, digits, '.', '_' or '-', starting with a "
             "letter or digit; it is also the NBD export name")


def run_volume_create(client: AdminClient, args: Namespace) -> Any:
    return client.call("volume.create", name=args.name, size=args.size,
                       region_size=args.region_size, read_only=args.read_only)


def show_volume_create(result: dict[str, Any], args: Namespace) -> None:
    extra = ", read-only" if result["read_only"] else ""
    print(f"created volume {result['name']}: {format_size(result['size'])}, "
          f"region size {format_size(result['region_size'])}{extra}")


def run_volume_list(client: AdminClient, args: Namespace) -> Any:
    return client.call("volume.list")


def show_volume_list(result: dict[str, Any], args: Namespace) -> None:
    volumes = result["volumes"]
    rows = [[v["name"], format_size(v["size"]), format_size(v["allocated"]),
             format_size(v["region_size"]), "ro" if v["read_only"] else "rw",
             str(v["connections"])] for v in volumes]
    print_table(["NAME", "SIZE", "ALLOCATED", "REGION", "MODE", "CONNS"], rows,
                right={1, 2, 3, 5}, empty="no volumes")


def run_volume_show(client: AdminClient, args: Namespace) -> Any:
    return client.call("volume.show", name=args.name)


def show_volume_show(result: dict[str, Any], args: Namespace) -> None:
    print_fields([
        ("name", result["name"]),
        ("size", f"{format_size(result['size'])} ({result['size']} bytes)"),
        ("allocated", f"{format_size(result['allocated'])} ({result['allocated']} bytes)"),
        ("region size", format_size(result["region_size"])),
        ("read-only", "yes" if result["read_only"] else "no"),
        ("connections", str(result["connections"])),
        ("path", result["path"]),
    ])


def run_volume_resize(client: AdminClient, args: Namespace) -> Any:
    return client.call("volume.resize", name=args.name, size=args.size)


def show_volume_resize(result: dict[str, Any], args: Namespace) -> None:
    print(f"volume {result['name']} is now {format_size(result['size'])}"
          " (clients see the new size when they reconnect)")


def run_volume_delete(client: AdminClient, args: Namespace) -> Any:
    return client.call("volume.delete", name=args.name, force=args.force)


def show_volume_delete(result: dict[str, Any], args: Namespace) -> None:
    closed = result.get("connections_closed", 0)
    extra = f", closed {closed} connection{'s' if closed != 1 else ''}" if closed else ""
    print(f"deleted volume {result['name']}{extra}")


def add_commands(commands: Commands) -> None:
    volumes = commands.group(
        "volume", "volume commands", help="create, list, show, resize and delete volumes",
        description="Volumes are the block devices splitd serves: each one is an NBD\n"
                    "export of the same name, backed by a sparse file in the daemon's\n"
                    "data directory.",
        examples="  splitctl volume create db 100G\n  splitctl volume list")

    sub = volumes.command(
        "create", run_volume_create, show_volume_create,
        help="create a volume",
        description="Create an empty volume. Its backing file is sparse: a new\n"
                    "volume uses no disk space until it is written.",
        examples="  splitctl volume create db 100G\n"
                 "  splitctl volume create scratch 512M --region-size 1M\n"
                 "  splitctl volume create golden 20GiB --read-only")
    sub.add_argument("name", metavar="NAME", type=types.name, help=NAME_HELP)
    sub.add_argument("size", metavar="SIZE", type=types.size,
                     help="size in bytes or with a K/M/G/T/P/E suffix (e.g. 64K, 10G, "
                          "1TiB); a multiple of 4096, less than 8E. The daemon's file "
                          "system may allow less (ext4: less than 16T)")
    sub.add_argument("--region-size", metavar="SIZE", type=types.region_size,
                     default=DEFAULT_REGION_SIZE,
                     help="granularity of the volume's change bitmaps: a power of two "
                          "from 4K to 64M (default 64K). Smaller regions copy less after "
                          "small writes but make bigger bitmaps; it cannot be changed later")
    sub.add_argument("--read-only", action="store_true",
                     help="serve the volume read-only (NBD writes are refused with EPERM)")

    volumes.command(
        "list", run_volume_list, show_volume_list,
        help="list every volume",
        description="List every volume with its size, the disk space it really\n"
                    "uses (ALLOCATED), its region size, whether it is read-only\n"
                    "(MODE ro) or not (rw), and how many NBD connections it has.",
        examples="  splitctl volume list\n  splitctl volume list --json")

    sub = volumes.command(
        "show", run_volume_show, show_volume_show,
        help="show one volume in detail",
        description="Show one volume: size, allocated space, region size,\n"
                    "read-only flag, open connections and backing file.",
        examples="  splitctl volume show db")
    sub.add_argument("name", metavar="NAME", type=types.name, help="the volume to show")

    sub = volumes.command(
        "resize", run_volume_resize, show_volume_resize,
        help="grow a volume",
        description="Grow a volume to SIZE. Volumes only grow: a smaller size\n"
                    "is refused. NBD clients connected now keep the old size\n"
                    "until they reconnect.",
        examples="  splitctl volume resize db 200G")
    sub.add_argument("name", metavar="NAME", type=types.name, help="the volume to grow")
    sub.add_argument("size", metavar="SIZE", type=types.size,
                     help="the new size (bytes or with a K/M/G/T/P/E suffix), at least the "
                          "current one, a multiple of 4096 and less than 8E")

    sub = volumes.command(
        "delete", run_volume_delete, show_volume_delete,
        help="delete a volume and its data",
        description="Delete a volume and its backing file. This cannot be undone.\n"
                    "A volume with open NBD connections is refused unless --force\n"
                    "is given, which closes those connections first.",
        examples="  splitctl volume delete scratch\n"
                 "  splitctl volume delete scratch --force")
    sub.add_argument("name", metavar="NAME", type=types.name, help="the volume to delete")
    sub.add_argument("--force", action="store_true",
                     help="close the volume's NBD connections and delete it anyway")

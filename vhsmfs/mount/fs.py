"""pyfuse3 operations: thin async handlers over the synchronous Vault (vault.py).

Each request that does I/O or crypto makes exactly one hop to a worker thread, bounded by a
CapacityLimiter; memory-only requests (lookup of known names, getattr, readdir) answer on the
loop. OSError and store errors become FUSEError(errno) here and only here, with one log line
that names the operation and inode, never file contents or key material.
"""

from __future__ import annotations

import bisect
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from vhsmfs.errors import IntegrityError, TokenNotFoundError, VhsmError
from vhsmfs.mount.lognames import logged_name
from vhsmfs.mount.vault import (
    ROOT_INO,
    UUID_RE,
    Attr,
    AttrChange,
    FileNode,
    Invalidation,
    Node,
    Vault,
    WouldBlock,
)

log = logging.getLogger("vhsm.mount")

T = TypeVar("T")
ENTRY_TIMEOUT = 10.0  # the kernel may cache names/attributes this long; CLI changes invalidate
BLKSIZE = 1 << 20  # advertised I/O size: tools like cp size their buffers from it
QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY}  # expected answers, logged at debug


def boundary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Translate errors raised below into FUSEError, with a log line."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: VaultOps, *args: Any) -> T:
        t0 = time.perf_counter()
        self.vault.last_request = time.monotonic()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            code = e.errno or errno.EIO
            level = logging.DEBUG if code in QUIET else logging.WARNING
            log.log(level, "%s%s: %s", fn.__name__, _brief(args), os.strerror(code))
            raise pyfuse3.FUSEError(code) from None
        except TokenNotFoundError as e:
            log.warning("%s%s: %s", fn.__name__, _brief(args), e)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except IntegrityError as e:
            log.error("%s%s: %s", fn.__name__, _brief(args), e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except VhsmError as e:
            log.error("%s%s: %s", fn.__name__, _brief(args), e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s%s failed", fn.__name__, _brief(args))
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:  # requests served and time spent per operation, logged at unmount
            n, total = self.timing.get(name, (0, 0.0))
            self.timing[name] = (n + 1, total + time.perf_counter() - t0)

    return wrapper


def _brief(args: tuple[Any, ...]) -> str:
    """Inode numbers (and names with --debug only: lognames.py), never the data of a write."""
    shown = [
        repr(a)
        if isinstance(a, int)
        else logged_name(a)
        if isinstance(a, bytes) and len(a) <= 255
        else "…"
        for a in args[:2]
    ]
    return "(" + ", ".join(shown) + ")"


def _invalidate_sync(inval: list[Invalidation]) -> None:
    for parent, name, ino in inval:
        try:
            pyfuse3.invalidate_entry(parent, os.fsencode(name), deleted=ino)
        except OSError as e:  # ENOENT: the kernel had not cached it
            log.debug("invalidate %d/%r: %s", parent, name, e)


def _entry(a: Attr, volatile: bool = False) -> pyfuse3.EntryAttributes:
    """`volatile`: names under the token directories, which change behind the kernel's back
    (a CLI store/delete, or an unlink through the file's other path) and are cheap to look up
    again, are not cached."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = 0 if volatile else ENTRY_TIMEOUT
    e.attr_timeout = ENTRY_TIMEOUT
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = 0
    e.st_size = a.size
    e.st_blksize = BLKSIZE
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


class VaultOps(pyfuse3.Operations):
    supports_dot_lookup = False
    # The kernel gathers small writes (tar writes 10 KiB records) into large requests and
    # sends them before flush/fsync; mtime/ctime then come from the kernel through setattr.
    # Measured both ways (docs/MOUNT.md, "The kernel's write-back cache"): off, every 4 KiB
    # write and every 10 KiB tar record is a request of its own (untar ~2.0-2.3x gocryptfs,
    # random writes 0.4-0.65x); on, unlink costs one more request (rm -rf ~1.8-1.9x).
    enable_writeback_cache = True

    def __init__(self, vault: Vault, *, threads: int = 8) -> None:
        super().__init__()
        self.vault = vault
        # Bounds worker threads (and so memory of requests in flight) across all requests.
        self.limiter = trio.CapacityLimiter(threads)
        self._fhs = itertools.count(1)
        self._files: dict[int, FileNode] = {}
        self._write_locks: dict[int, trio.StrictFIFOLock] = {}
        self._dirs: dict[int, tuple[int, list[tuple[int, str, Node]]]] = {}
        self.hops = 0  # thread hops in flight (the loop does not spin for requests meanwhile)
        self.stats: dict[str, int] = {}  # read/write counts, logged at unmount
        self.timing: dict[str, tuple[int, float]] = {}

    async def _hop(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        self.hops += 1
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kw), limiter=self.limiter
            )
        finally:
            self.hops -= 1

    async def _now_or_hop(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Namespace changes that need no I/O (the usual case for mkdir, unlink, chmod, utime)
        answer on the loop; if a lock is taken or I/O turns out to be needed, one hop."""
        try:
            return self.vault.now(fn, *args, **kw)
        except WouldBlock:
            return await self._hop(fn, *args, **kw)

    async def housekeeping(self, period: float = 0.5) -> None:
        """Publish deferred metadata changes about twice a second (see Vault.flush_pending)."""
        while True:
            await trio.sleep(period)
            if self.vault.has_pending():
                try:
                    await self._hop(self.vault.flush_pending)
                except Exception:
                    log.exception("publishing deferred changes failed")

    def _invalidate(self, inval: list[Invalidation]) -> None:
        for parent, name, ino in inval:
            try:
                pyfuse3.invalidate_entry_async(
                    parent, os.fsencode(name), deleted=ino, ignore_enoent=True
                )
            except Exception as e:  # the entry may simply not be cached
                log.debug("invalidate %d/%r: %s", parent, name, e)

    async def _invalidate_now(self, inval: list[Invalidation]) -> None:
        """Synchronous invalidation, in a thread so the loop keeps serving the requests the
        kernel may be waiting on. Only from handlers that are not 'related' to the entries
        (see pyfuse3.invalidate_entry), e.g. opendir."""
        if inval:
            await self._hop(_invalidate_sync, inval)

    def _fh(self, fh: int) -> FileNode:
        node = self._files.get(fh)
        if node is None:
            raise OSError(errno.EBADF, "bad file handle")
        return node

    # -- names and attributes --------------------------------------------------------------------
    @boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        v = self.vault
        try:
            node = v.lookup(parent_inode, text)
        except FileNotFoundError:
            if parent_inode != ROOT_INO or not UUID_RE.match(text):
                raise
            found = await self._hop(v.lookup_token, text)  # stored by the CLI meanwhile?
            if found is None:
                raise
            node = found
        v.remember(node)
        return _entry(v.attr(node), v.volatile(parent_inode, node))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.vault.forget(ino, n)

    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(self.vault.attr(self.vault.node(inode)))

    @boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = await self._now_or_hop(
            self.vault.setattr,
            inode,
            size=attr.st_size if fields.update_size else None,
            change=AttrChange(
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ),
        )
        return _entry(self.vault.attr(node))

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        st = await self._hop(self.vault.statfs)
        if st is not None:
            s.f_bsize, s.f_frsize = st.f_bsize, st.f_frsize
            s.f_blocks, s.f_bfree, s.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
            s.f_files, s.f_ffree, s.f_favail = st.f_files, st.f_ffree, st.f_favail
        s.f_namemax = 255
        return s

    # -- directories ------------------------------------------------------------------------------
    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        v = self.vault
        v.dir(inode)
        if inode == ROOT_INO:  # listing the top level picks up CLI stores and deletes
            await self._invalidate_now(await self._hop(v.rescan))
        fh = next(self._fhs)
        self._dirs[fh] = (inode, v.listing(inode))
        return fh

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, entries = self._dirs[fh]
        v = self.vault
        k = bisect.bisect_right(entries, start_id, key=lambda e: e[0])
        for seq, name, node in entries[k:]:
            if not v.still_there(inode, name, node):
                continue  # removed since opendir: never listed twice, never shifts the rest
            attrs = _entry(v.attr(node), v.volatile(inode, node))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, seq):
                break
            v.remember(node)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode, _ = self._dirs[fh]
        await self._hop(self.vault.fsyncdir, inode)

    @boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        d = await self._now_or_hop(
            self.vault.mkdir, parent_inode, os.fsdecode(name), mode & ~ctx.umask, ctx.uid, ctx.gid
        )
        return _entry(self.vault.attr(d))

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._invalidate(await self._now_or_hop(self.vault.rmdir, parent_inode, os.fsdecode(name)))

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._invalidate(await self._now_or_hop(self.vault.unlink, parent_inode, os.fsdecode(name)))

    @boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        self._invalidate(
            await self._hop(
                self.vault.rename,
                parent_inode_old,
                os.fsdecode(name_old),
                parent_inode_new,
                os.fsdecode(name_new),
                noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            )
        )

    @boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EPERM, "the vault holds regular files and directories only")

    @boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EPERM, "hard links are not supported")

    @boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise OSError(errno.EPERM, "the vault holds regular files and directories only")
        node = await self._hop(
            self._mknod, parent_inode, os.fsdecode(name), mode & ~ctx.umask, ctx.uid, ctx.gid
        )
        return _entry(self.vault.attr(node))

    def _mknod(self, parent: int, name: str, mode: int, uid: int, gid: int) -> FileNode:
        node = self.vault.create(parent, name, mode, uid, gid)
        self.vault.release(node)  # publishes the empty file
        return node

    # -- files ------------------------------------------------------------------------------------
    @boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = await self._now_or_hop(
            self.vault.create, parent_inode, os.fsdecode(name), mode & ~ctx.umask, ctx.uid, ctx.gid
        )
        fh = next(self._fhs)
        self._files[fh] = node
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), _entry(self.vault.attr(node))

    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = await self._hop(self.vault.open, inode, bool(flags & os.O_TRUNC))
        fh = next(self._fhs)
        self._files[fh] = node
        # Only this mount changes a token's content, so cached pages stay valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _count(self, what: str, nbytes: int, inline: bool) -> None:
        st = self.stats
        st[what] = st.get(what, 0) + 1
        st[what + "_bytes"] = st.get(what + "_bytes", 0) + nbytes
        if inline:
            st[what + "_inline"] = st.get(what + "_inline", 0) + 1

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        node = self._fh(fh)
        data = self.vault.read_now(node, off, size)  # decrypted already: no hop needed
        self._count("read", size, data is not None)
        if data is not None:
            return data
        return await self._hop(self.vault.read, node, off, size)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._fh(fh)
        # Several writes to one file may arrive at once (threads of one program, or several
        # descriptors): they queue here, in order, rather than contend for the file's lock in
        # worker threads.
        lock = self._write_locks.get(node.ino)
        if lock is None or not lock.locked():
            # Nothing queued for this file: a write that is a memory copy needs no lock (it
            # runs to completion without yielding to trio).
            done = self.vault.write_now(node, off, buf)
            if done is not None:
                self._count("write", len(buf), True)
                return done
        if lock is None:
            lock = self._write_locks[node.ino] = trio.StrictFIFOLock()
        async with lock:
            done = self.vault.write_now(node, off, buf)  # a memory copy: no hop needed
            self._count("write", len(buf), done is not None)
            if done is not None:
                return done
            return await self._hop(self.vault.write, node, off, buf)

    @boundary
    async def flush(self, fh: int) -> None:
        node = self._fh(fh)
        if not self.vault.needs_flush(node):
            return
        await self._hop(self.vault.flush, node)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._hop(self.vault.fsync, self._fh(fh))

    @boundary
    async def release(self, fh: int) -> None:
        node = self._files.pop(fh, None)
        if node is not None:
            if not any(n is node for n in self._files.values()):
                self._write_locks.pop(node.ino, None)
            self._invalidate(await self._now_or_hop(self.vault.release, node))

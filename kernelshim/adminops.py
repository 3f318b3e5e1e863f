"""The shim server's administration: principals (add, set, remove, list), process
registration, and statistics. Who may change what is decided by the principal table
(`principals.py`); this module checks arguments and pages the listings.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from .connection import PAGE_ROWS, Connection, ServerBase, ServiceHistogram
from .principals import (LIMIT_BANKS, NO_LIMIT, OBJECT_BANKS, QUEUE_BANKS, Banks, NotAllowed,
                         Principal, Rate)
from .protocol import NOTICE_CHARS, arg_int, arg_str
from .rooterror import SluiceError


class AdminOps(ServerBase):
    """The `_op_*` of administration (mixed into ShimServer)."""

    async def _op_register(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        principal = self.principals.get_for(arg_str(p, "principal", maxlen=64),
                                            conn.creds.uid, "run as")
        self.principals.register(conn.creds.pid, principal, uid=conn.creds.uid,
                                 started=conn.creds.start_time)
        return {"pid": conn.creds.pid, "principal": principal.name}

    async def _op_notice(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        """Free text to the clients subscribed to "notice" — every connection, or those
        of one principal — from root or the volume's owner (the daemon's uid)."""
        if conn.creds.uid not in (0, os.geteuid()):
            raise NotAllowed("only root or the volume's owner may send a notice")
        text = arg_str(p, "text", maxlen=NOTICE_CHARS)
        body = {"text": text, "uid": conn.creds.uid}
        if p.get("principal") is None:
            return {"sent": self.push_to(self._conns, "notice", body)}
        who = self.principals.get(arg_str(p, "principal", maxlen=64))
        return {"sent": self.push(who, "notice", body)}

    async def _op_whoami(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        who = self.principals.resolve(conn.creds.pid, conn.creds.uid)
        return {"pid": conn.creds.pid, "uid": conn.creds.uid, "principal": who.name}

    @staticmethod
    def _banks_args(p: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("space", "inodes", "cache_min", "cache_max", "io_weight", *OBJECT_BANKS,
                  *QUEUE_BANKS):
            if k in p and p[k] is not None:
                if p[k] == NO_LIMIT and k in LIMIT_BANKS:
                    out[k] = None  # no limit of its own: its ancestors' only
                else:
                    out[k] = arg_int(p, k, hi=1 << 62)
        for k in ("io_reserve", "io_limit"):
            if k in p and p[k] is not None:
                out[k] = Rate.parse(arg_str(p, k, maxlen=64))
        return out

    async def _op_principal_add(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        args = self._banks_args(p)
        given = arg_str(p, "parent", optional=True, maxlen=64)
        parent = given or "root"
        # Kernel-object and request banks not asked for: the default, or what the
        # parent has if that is less (asking for more than the parent holds stays an
        # error).
        try:
            par = self.principals.get_for(parent, conn.creds.uid, "add principals under")
        except NotAllowed as exc:
            if parent != "root" or conn.creds.uid == 0:
                raise
            own = f"uid-{conn.creds.uid}"
            fallback: Principal | None = None
            if not given:
                # No parent named, and root's is not the user's to use: its own
                # principal (probe 27, F12: a default nobody but root could take)
                try:
                    fallback = self.principals.get_for(own, conn.creds.uid,
                                                       "add principals under")
                except SluiceError:
                    pass
            if fallback is None:
                # (what a user on its own mount tries first: say what works; probe 19, F6)
                raise NotAllowed(f"{exc} (add it under your own principal: --parent "
                                 f"{own})") from None
            par = fallback
        defaults = Banks()
        for k in (*OBJECT_BANKS, *QUEUE_BANKS):
            if k not in args:
                lim = self.principals.effective(par, k)
                mine = getattr(defaults, k)
                args[k] = mine if lim is None or (mine is not None and mine <= lim) else lim
        owner = arg_int(p, "owner_uid", hi=(1 << 32) - 2) if p.get("owner_uid") is not None \
            else conn.creds.uid
        pr = self.principals.add(arg_str(p, "name", maxlen=64), parent=par.name,
                                 owner_uid=owner, banks=Banks(**args),
                                 caller_uid=conn.creds.uid)
        return {"id": pr.id, "name": pr.name}

    async def _op_principal_set(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        pr = self.principals.set(arg_str(p, "name", maxlen=64), conn.creds.uid,
                                 **self._banks_args(p))
        return {"id": pr.id, "name": pr.name}

    async def _op_principal_rm(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        name = arg_str(p, "name", maxlen=64)
        move_to = arg_str(p, "move_to", optional=True, maxlen=64) or None
        victim = self.principals.get_for(name, conn.creds.uid, "remove")
        heir = self.principals.remove(name, conn.creds.uid, move_to=move_to, save=False)
        try:
            if heir is not None:
                # Re-tagged, durably (a durable commit shared with other re-tags and
                # bounded in rate, its flush charged to the caller: probe 3, F4; to
                # the heir if the caller's connection is the removed principal's).
                by = conn.principal
                if self.principals.by_id(by.id) is not by:
                    by = heir
                await self.service.move_storage(victim, heir, by=by)
        finally:
            self.principals.save()
        return {"removed": name, "storage_to": heir.name if heir else None}

    def _page(self, conn: Connection, p: dict[str, Any]) -> tuple[list[Principal], int | None]:
        """The principals of the page `cursor` names (of those the caller may see), and
        the cursor of the next page (None: this is the last)."""
        cursor = arg_int(p, "cursor", hi=1 << 31) if p.get("cursor") is not None else 0
        rows = self.principals.visible_to(conn.creds.uid, conn.principal)
        end = cursor + PAGE_ROWS
        return rows[cursor:end], (end if end < len(rows) else None)

    def _context(self, conn: Connection, page: list[Principal]) -> list[Principal]:
        """Of the page, the rows the caller sees only as ancestors of its own
        (PrincipalTable.context_only): their usage is other tenants'."""
        return self.principals.context_only(page, conn.creds.uid, conn.principal)

    async def _between_parts(self, conn: Connection) -> None:
        """Between two parts of a costly operation: while principals compete, once the
        step's quantum is used or a request of a principal with no backlog has come
        (FairTurns.part_done), the turn goes to the others and is taken again."""
        now = trio.current_time()
        if now < self.turns.contended_until and self.turns.part_done(self._last_yield, now):
            assert conn.turn is not None
            self.turns.backlogged(conn.turn)  # the rest of the operation is left over
            await self._give_turn()
            await self.turns.take(conn.turn)

    async def _op_principal_ls(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        """In two parts (the page: a walk of the table; its rows), as `stats`."""
        page, nxt = self._page(conn, p)
        await self._between_parts(conn)
        rows = self.principals.info(page, context=self._context(conn, page))
        return {"principals": [i.as_dict() for i in rows], "next_cursor": nxt}

    async def _op_stats(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        """Built a part at a time (device, pager, principals, ...), only for the
        principals of the page: while principals compete and the step's quantum is
        used (or another's request came: `_between_parts`), the turn goes to the
        others between two parts, so `stats` is no longer
        one uncuttable step (~0.15 ms quiet, 0.4-0.5 ms loaded). The parts are then
        snapshots of moments a few steps apart, each consistent in itself."""
        page, nxt = self._page(conn, p)
        out: dict[str, Any] = {}
        context = [q.name for q in self._context(conn, page)]
        for key, value in self.service.statistics_parts(names=[q.name for q in page],
                                                        context=context,
                                                        by_kind=conn.creds.uid == 0):
            out[key] = value
            await self._between_parts(conn)
        out["next_cursor"] = nxt
        return out

    async def _op_shim_stats(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        """Per principal (of the page, of those the caller may see): the server's own
        latency of its requests (`service`: from the request's turn being asked for to
        its reply written or queued; `waited`: of which waiting for the principal's
        turn or a rate limit) and how often a turn waited for another connection of
        the same tenant (`turns_waited`, on the tenant's row: the turn is a tenant's,
        FairTurns). `loop`: how long the batches of the event loop took (a socket
        that becomes readable waits up to about two of them) and the share of that
        time the loop thread was on a CPU, and the percentiles of its CPU time per batch
        (`cpu_p50_ms`, `cpu_p99_ms`: what a request waits for a batch whatever else the
        machine runs), `idle_spun_ms`: the loop thread's time spent polling for a
        next request since the daemon started (on a CPU, serving nothing: fs/idlepoll.py;
        never reset), and `parked`: steps of backlogged principals put off to a later
        batch (FairTurns, BATCH_SECONDS); `bursts`, `burst_writes`, `burst_cpu_ms`:
        bursts of pipelined overwrites relocated together, the writes they served and
        the loop thread's CPU time in them (docs/dev/protocol.md,
        "Bursts of overwrites"). Root may `reset` them after reading."""
        page, nxt = self._page(conn, p)
        rows = {}
        context = self._context(conn, page)
        for q in page:
            if q in context:  # another tenant's activity
                continue
            sh = self.turns.shares.get(q.id)
            if sh is not None:
                rows[q.name] = {**sh.service.summary(),
                                "waited_p50_ms": sh.waited.percentile(0.5) * 1e3,
                                "waited_p99_ms": sh.waited.percentile(0.99) * 1e3,
                                "turns_waited": sh.turns_waited}
        t = self.turns
        loop = {**t.batches.summary(),
                "on_cpu": t.batch_cpu / t.batch_wall if t.batch_wall else 1.0,
                "cpu_p50_ms": t.batches_cpu.percentile(0.5) * 1e3,
                "cpu_p99_ms": t.batches_cpu.percentile(0.99) * 1e3,
                "parked": t.parked, "deferred": t.deferred,
                "preempted": t.preempted,
                "bursts": t.bursts, "burst_writes": t.burst_writes,
                "burst_cpu_ms": t.burst_cpu * 1e3,
                "side_misses": t.side_misses, "held": t.held,
                "idle_spun_ms": self.idle_spun() * 1e3}
        if p.get("reset") and conn.creds.uid == 0 and nxt is None:
            for sh in self.turns.shares.values():
                sh.service, sh.waited, sh.turns_waited = ServiceHistogram(), ServiceHistogram(), 0
            t.reset_statistics()
        return {"per_principal": rows, "loop": loop, "next_cursor": nxt}

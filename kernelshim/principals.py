"""Principals and their banks: who is charged for what, and how much each may hold.

A tree of principals rooted at `root`. Each has banks carved from its parent's:

- storage: `space` (bytes: data blocks, plus a fixed cost per directory entry) and
  `inodes`;
- memory: cache frames, `cache_min` (guaranteed) and `cache_max` (ceiling), in bytes;
- I/O: `io_reserve`, `io_weight`, `io_limit` (enforced by the device's scheduler); a
  reservation or a limit is a `Rate` in IOPS, in bytes/s or both (the tighter applies);
- kernel objects: `grants` (open grants), `caps` (capability slots), `connections`
  (control-socket connections acting for it), `shm` (bytes of shared buffers its
  connections have attached) and `children` (principals below it, at any depth);
- requests held or served for it: `parked` and `parked_bytes` (FUSE requests waiting
  for admission after giving their worker back, fs/operations.py Admission) and
  `costly_rate` (costly control-socket operations a second, the shim server); each
  charged to the principal and its ancestors below root.

Every new principal gets the kernel-object and request defaults (DEFAULT_*, banks.py);
root (the owner of the whole device) has no kernel-object limits of its own, so the
shim server's global caps bound it; its request banks bound its own requests and, as
ceilings, everyone's. Root may change any principal's banks (`principal_set`); an owner may give its own
children at most what it holds itself.

Limits (space, inodes, cache_max, io_limit, grants, caps) are ceilings: a child's may
not exceed its parent's. Guarantees (cache_min, io_reserve) are carved: the children's
together may not exceed their parent's. Asking for more is an error, never a silent
downgrade.

Usage is charged hierarchically: charging a principal charges each ancestor too, and
the charge fails (QuotaExceeded, nothing changed) if any of them would go over a
limit. Usage is not stored: the metadata server recomputes it from the volume at
mount, so it is exact after a crash.

The tree is stored in the volume as `principals.json` (written atomically on change).

This module is the tree, its persistence and who may change it; its records, errors
and defaults are in `banks.py`, the rules a bank must keep in `bankrules.py`,
hierarchical charging in `accounting.py`, the pid registry in `processes.py`. Sizes and
rates (`Rate`) are parsed in `blockdev/units.py`. The names of all of them that the
rest of sluice uses are importable from here.

Identity: a process belongs to the principal registered for it or for its nearest
registered ancestor (`sluice run` registers itself, then execs the program);
otherwise to its uid's default principal (`uid-N`, made on first use under root;
uid 0 falls to root).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

from blockdev import (BankNode, BankTree, PrincipalId, ROOT_PRINCIPAL, Rate, StoreFileError,
                      read_json_file, write_durably)

from . import accounting, bankrules
from .banks import DEFAULT_CAPS as DEFAULT_CAPS
from .banks import DEFAULT_CHILDREN as DEFAULT_CHILDREN
from .banks import DEFAULT_CONNECTIONS as DEFAULT_CONNECTIONS
from .banks import DEFAULT_COSTLY_RATE as DEFAULT_COSTLY_RATE
from .banks import DEFAULT_GRANTS as DEFAULT_GRANTS
from .banks import DEFAULT_PARKED as DEFAULT_PARKED
from .banks import DEFAULT_PARKED_BYTES as DEFAULT_PARKED_BYTES
from .banks import DEFAULT_SHM as DEFAULT_SHM
from .banks import ENTRY_COST as ENTRY_COST
from .banks import LIMIT_BANKS as LIMIT_BANKS
from .banks import NO_LIMIT as NO_LIMIT
from .banks import OBJECT_BANKS as OBJECT_BANKS
from .banks import QUEUE_BANKS as QUEUE_BANKS
from .banks import Banks as Banks
from .banks import NoSuchPrincipal as NoSuchPrincipal
from .banks import NotAllowed as NotAllowed
from .banks import Principal as Principal
from .banks import PrincipalError as PrincipalError
from .banks import PrincipalExists as PrincipalExists
from .banks import PrincipalInfo as PrincipalInfo
from .banks import QuotaExceeded as QuotaExceeded
from .banks import TooManyObjects as TooManyObjects
from .banks import Usage as Usage
from .banks import bank_node, root_banks
from .errors import PrincipalsReadOnly
from .processes import ProcessRegistry

__all__ = ["DEFAULT_CAPS", "DEFAULT_CHILDREN", "DEFAULT_CONNECTIONS", "DEFAULT_COSTLY_RATE",
           "DEFAULT_GRANTS", "DEFAULT_PARKED", "DEFAULT_PARKED_BYTES",
           "DEFAULT_SHM", "ENTRY_COST", "FILE", "OBJECT_BANKS", "QUEUE_BANKS", "Banks", "NoSuchPrincipal",
           "NotAllowed", "Principal", "PrincipalError", "PrincipalExists", "PrincipalInfo",
           "PrincipalTable", "QuotaExceeded", "Rate", "TooManyObjects", "Usage"]

log = logging.getLogger(__name__)

FILE = "principals.json"
#: principal ids a file may hold: 1..2**31-1 (the scheduler and the charge tags keep
#: them in 64-bit integers; a crafted file's 2**70 must not reach them)
MAX_PRINCIPAL_ID = 1 << 31
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: the names of uids' default principals: `uid-N` is uid N's, made on first use under
#: root and owned by N; nobody else may take one (not even by adding it elsewhere)
_DEFAULT_RE = re.compile(r"^uid-[0-9]+$")


def _default_name(uid: int) -> str:
    return f"uid-{uid}"


def _fallback_name(uid: int) -> str:
    """The default of a uid whose `uid-N` is taken by a principal that is not its
    default (added before uid-N names were reserved). ':' is outside the names anyone
    may add, so this one cannot be squatted."""
    return f"uid-{uid}:default"


#: the largest principals.json the loader reads (a crafted one is refused, not loaded)
PRINCIPALS_FILE_LIMIT = 256 << 20


class PrincipalTable:
    """The tree of principals of one volume, and the pid registry of a mount."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._by_id: dict[int, Principal] = {}
        self._by_name: dict[str, Principal] = {}
        #: the next principal id: ids are never reused (storage tagged with a removed
        #: id must not be charged to whoever is added next), so it is saved too
        self._next_id = 1
        self.root = self._insert(ROOT_PRINCIPAL, "root", None, 0, root_banks())
        #: processes registered by `sluice run`
        self._processes: ProcessRegistry[Principal] = ProcessRegistry()
        #: called with the snapshot a change would make, before it is made; one that
        #: raises refuses the change (see add_bank_validator)
        self._bank_validators: list[Callable[[BankTree], None]] = []
        #: uid-N defaults made in memory for a request or a connection, not yet used:
        #: neither saved nor listed until they hold storage, a child or banks of their
        #: own (a refused `sluice run`, a stat, must leave no principal behind)
        self._provisional: set[Principal] = set()
        #: why the volume is read-only (its filesystem says so: a read-only mount, a
        #: failure), or None: then add, set and remove are refused and nothing is saved
        self.read_only: str | None = None
        #: called with a new bank snapshot after every change of the tree or a bank
        self._watchers: list[Callable[[BankTree], None]] = []
        #: uids whose `uid-N` name another principal holds (logged once each)
        self._squatted_warned: set[int] = set()

    # -- persistence ---------------------------------------------------------------------

    @classmethod
    def load(cls, directory: Path) -> PrincipalTable:
        t = cls(directory / FILE)
        try:
            # (~450 bytes a principal: room for every principal a tenant's banks allow
            # hundreds of tenants; the table is written without a bound of its own)
            data = read_json_file(directory / FILE, limit=PRINCIPALS_FILE_LIMIT)
        except FileNotFoundError:
            return t
        except (OSError, StoreFileError) as exc:
            raise PrincipalError(f"cannot read {directory / FILE}: {exc.strerror}"
                                 if isinstance(exc, OSError) else str(exc)) from None
        try:
            t._load(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # (a bad rate string is a UnitError, a ValueError)
            raise PrincipalError(f"{directory / FILE} is malformed: {exc!r}") from None
        return t

    def _load(self, data: Any) -> None:
        directory = self.path.parent if self.path is not None else Path(".")
        self.root.banks = Banks.from_json(data["root"]["banks"], base=root_banks())
        if not isinstance(data["principals"], list):
            raise TypeError("principals is not a list")
        pending = list(data["principals"])
        for rec in pending:
            if not isinstance(rec, dict):
                raise TypeError(f"principal record {rec!r} is not an object")
            if type(rec["id"]) is not int or not 0 < rec["id"] < MAX_PRINCIPAL_ID:
                raise ValueError(f"principal id {rec['id']!r} is not in 1..{MAX_PRINCIPAL_ID - 1}")
            if not isinstance(rec["name"], str) or not _NAME_RE.match(rec["name"].split(":")[0]) \
                    or not isinstance(rec["parent"], str):
                raise ValueError(f"principal name {rec['name']!r} or parent "
                                 f"{rec['parent']!r} is not a principal name")
            # (up to 2**32: what `principal add` accepted before it was bounded as `add`)
            if type(rec["owner_uid"]) is not int or not 0 <= rec["owner_uid"] <= 1 << 32:
                raise ValueError(f"principal {rec['name']!r}: owner uid {rec['owner_uid']!r} "
                                 "is not a uid")
        ids = [rec["id"] for rec in pending]
        names = [rec["name"] for rec in pending]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names) or "root" in names:
            raise ValueError("two principals have the same id or name")
        # Parents before children (the file lists them so, but be forgiving).
        while pending:
            progressed = False
            for rec in list(pending):
                parent = self._by_name.get(rec["parent"])
                if parent is None:
                    continue
                if ":" in rec["name"] and not (parent is self.root and rec["name"]
                                               == _fallback_name(rec["owner_uid"])):
                    raise ValueError(f"principal {rec['name']!r}: only a uid's fallback "
                                     "default (uid-N:default, under root, owner N) has ':'")
                self._insert(PrincipalId(rec["id"]), rec["name"], parent, rec["owner_uid"],
                             Banks.from_json(rec["banks"]))
                pending.remove(rec)
                progressed = True
            if not progressed:
                raise PrincipalError(f"{directory / FILE}: principals with unknown parents: "
                                     + ", ".join(r["name"] for r in pending))
        next_id = data.get("next_id", 0)
        if type(next_id) is not int or not 0 <= next_id <= MAX_PRINCIPAL_ID:
            raise ValueError(f"next_id {next_id!r} is not in 0..{MAX_PRINCIPAL_ID}")
        self._next_id = max(next_id, max(self._by_id) + 1)

    def save(self) -> None:
        if self.path is None or self.read_only is not None:
            return
        recs = []
        for p in self.walk():
            if p is self.root or p in self._provisional:
                continue
            assert p.parent is not None
            recs.append({"id": p.id, "name": p.name, "parent": p.parent.name,
                         "owner_uid": p.owner_uid, "banks": p.banks.to_json()})
        data = {"root": {"banks": self.root.banks.to_json()}, "principals": recs,
                "next_id": self._next_id}
        # Durable (a principal change must survive a power loss) and 0600: it names
        # every tenant and its owner uid.
        write_durably(self.path, (json.dumps(data, indent=1) + "\n").encode())

    # -- pushing banks down -------------------------------------------------------------

    def bank_tree(self) -> BankTree:
        """A snapshot of every principal's memory and I/O banks, for the pager and the
        scheduler (which may not see this table: they sit below kernelshim)."""
        out: dict[PrincipalId, BankNode] = {}
        for p in self.walk():
            out[p.id] = bank_node(p.id, p.parent.id if p.parent is not None else None,
                                  p.name, p.banks)
        return out

    def watch(self, callback: Callable[[BankTree], None]) -> None:
        """Call `callback(bank_tree())` now and after every change of the tree or of a
        bank (add, set, remove, a uid's default principal made on first use)."""
        self._watchers.append(callback)
        callback(self.bank_tree())

    def add_bank_validator(self, validator: Callable[[BankTree], None]) -> None:
        """Have `validator(tree)` admission-check every change of a bank (`add`, `set`)
        before it is saved: it gets the snapshot the change would make, and raises
        PrincipalError to refuse it (nothing changes then). The layers below use this
        for what only they can know, e.g. the pager whether the guarantees together
        still fit its pool."""
        self._bank_validators.append(validator)

    def _validate_change(self, undo: Callable[[], None]) -> None:
        """Run the bank validators on the tree as it is now (with the change applied);
        if one refuses, `undo` the change and re-raise."""
        if not self._bank_validators:
            return
        tree = self.bank_tree()
        try:
            for v in self._bank_validators:
                v(tree)
        except BaseException:
            undo()
            raise

    def _changed(self) -> None:
        if self._watchers:
            tree = self.bank_tree()
            for cb in self._watchers:
                cb(tree)

    # -- the tree ------------------------------------------------------------------------

    def _take_id(self) -> PrincipalId:
        pid = PrincipalId(self._next_id)
        self._next_id += 1
        return pid

    def _insert(self, pid: PrincipalId, name: str, parent: Principal | None, owner: int,
                banks: Banks) -> Principal:
        p = Principal(pid, name, parent, owner, banks)
        self._by_id[pid] = p
        self._by_name[name] = p
        if parent is not None:
            parent.children.append(p)
            # checked by add(); unchecked here, so that load() counts what is there
            accounting.apply(parent, {"children": 1})
        return p

    def _uninsert(self, p: Principal) -> None:
        """Undo `_insert` (a refused `add`, a `remove`); the id is not given out again
        (ids are never reused)."""
        assert p.parent is not None and not p.children
        p.parent.children.remove(p)
        accounting.apply(p.parent, {"children": -1})
        del self._by_id[p.id]
        del self._by_name[p.name]

    def walk(self, top: Principal | None = None) -> Iterator[Principal]:
        stack = [top or self.root]
        while stack:
            p = stack.pop()
            yield p
            stack.extend(reversed(p.children))

    def get(self, name: str) -> Principal:
        p = self._by_name.get(name)
        if p is None:
            raise NoSuchPrincipal(f"no principal named {name!r}")
        return p

    def by_id(self, pid: int) -> Principal:
        p = self._by_id.get(pid)
        if p is None:
            # Charges recorded for a principal that was removed go to root.
            return self.root
        return p

    def effective(self, p: Principal, bank: str) -> int | None:
        """The tightest limit on `bank` along p's chain (None: no limit)."""
        return bankrules.effective(p, bank)

    # -- changes (admin policy: who may change which principal) --------------------------

    def _may_administer(self, p: Principal, uid: int) -> bool:
        return uid == 0 or any(q.owner_uid == uid and q is not self.root for q in p.chain())

    def _refuse_unseen(self, name: str, uid: int, verb: str) -> NotAllowed:
        """The one answer to a non-root caller about a principal it may not `verb`,
        whether or not `name` exists: the refusal must not tell a tenant which names
        other tenants use (README "Principals")."""
        return NotAllowed(f"uid {uid} may not {verb} principal {name!r}")

    def get_for(self, name: str, uid: int, verb: str, *,
                may: Callable[[Principal, int], bool] | None = None) -> Principal:
        """The principal `name` if `uid` may `verb` it (`may(p, uid)`, default: may
        administer it); otherwise, for root NoSuchPrincipal, for anyone else the same
        NotAllowed whether `name` exists or not."""
        p = self._by_name.get(name)
        if uid == 0:
            if p is None:
                hint = ""
                if _DEFAULT_RE.match(name) and str(int(name[4:])) == name[4:]:
                    # (a uid's default is made when the uid first uses the volume)
                    hint = (f": uid {name[4:]} has not used the volume yet; add it "
                            f"first (principal add {name} --owner {name[4:]}) to give "
                            "it banks before then")
                raise NoSuchPrincipal(f"no principal named {name!r}{hint}")
            return p
        if p is None or not (may or self._may_administer)(p, uid):
            raise self._refuse_unseen(name, uid, verb)
        return p

    def _writable(self) -> None:
        if self.read_only is not None:
            raise PrincipalsReadOnly(f"the volume is read-only ({self.read_only}): its "
                                     "principals cannot be added, changed or removed")

    def add(self, name: str, *, parent: str = "root", owner_uid: int, banks: Banks,
            caller_uid: int) -> Principal:
        self._writable()
        banks = banks.normalised()
        if not 0 <= owner_uid <= (1 << 32) - 2:  # as the table's loader checks it
            raise PrincipalError(f"bad owner uid {owner_uid}")
        if not _NAME_RE.fullmatch(name):
            raise PrincipalError(f"bad principal name {name!r} (letters, digits, _ . -; "
                                 "at most 64)")
        # Who may add here first: a caller refused under `parent` learns nothing of
        # `name`, nor whether `parent` exists.
        par = self.get_for(parent, caller_uid, "add principals under")
        if _DEFAULT_RE.match(name) and not (caller_uid == 0 and par is self.root
                                           and name == _default_name(owner_uid)):
            if caller_uid == 0 and par is self.root and str(int(name[4:])) == name[4:]:
                raise NotAllowed(f"{name!r} is reserved for the default principal of "
                                 f"uid {name[4:]}: add it owned by that uid (--owner "
                                 f"{name[4:]})")
            raise NotAllowed(f"{name!r}: names uid-N are reserved for uid N's default "
                             "principal (only root may add one, under root, owned by N)")
        if name in self._by_name:
            q = self._by_name[name]
            if caller_uid == 0 or q in self.visible_to(caller_uid):
                raise PrincipalExists(f"principal {name!r} exists")
            # Names are global, so a taken name cannot be given out again; say that
            # much, but not that it is a principal, whose, or where.
            raise PrincipalExists(f"principal name {name!r} is not available")
        bankrules.check_child_banks(par, banks, exclude=None, parent_is_root=par is self.root)
        accounting.check(par, accounting.kernel_object("children", 1))
        p = self._insert(self._take_id(), name, par, owner_uid, banks)
        self._validate_change(lambda: self._uninsert(p))
        self._keep(par)
        self.save()
        self._changed()
        return p

    def set(self, name: str, caller_uid: int, **changes: Any) -> Principal:
        self._writable()
        p = self.get_for(name, caller_uid, "change",
                         may=lambda q, uid: q.parent is not None
                         and self._may_administer(q.parent, uid))
        banks = dataclasses.replace(p.banks, **changes).normalised()
        old = p.banks  # put back if a bank validator refuses the change
        if p.parent is not None:
            bankrules.check_child_banks(p.parent, banks, exclude=p,
                                        parent_is_root=p.parent is self.root)
        else:
            bankrules.check_own_banks(banks)
        bankrules.check_children_fit(p, banks, is_root=p is self.root)
        p.banks = banks
        self._validate_change(lambda: setattr(p, "banks", old))
        self._keep(p)
        self.save()
        self._changed()
        return p

    def remove(self, name: str, caller_uid: int, *, move_to: str | None = None,
               save: bool = True) -> Principal | None:
        """Remove a principal with no children. If it still owns storage, `move_to` must
        name the principal that takes it (the caller then re-tags the storage, makes
        that durable, and only then saves the table: pass `save=False`, so that a crash
        in between leaves the principal in place rather than its storage tagged with a
        removed id). Returns the principal that takes its storage, if any."""
        self._writable()
        p = self.get_for(name, caller_uid, "remove",
                         may=lambda q, uid: q.parent is not None
                         and self._may_administer(q.parent, uid))
        if p is self.root:
            raise NotAllowed("the root principal cannot be removed")
        assert p.parent is not None
        if p.children:
            raise PrincipalError(f"principal {name!r} has children: "
                                 + ", ".join(c.name for c in p.children)
                                 + ": remove them first")
        if p.usage.grants or p.usage.caps:
            raise PrincipalError(f"principal {name!r} holds {p.usage.grants} open grants and "
                                 f"{p.usage.caps} capability slots: close them first")
        heir: Principal | None = None
        if p.usage.space or p.usage.inodes:
            if move_to is None:
                raise PrincipalError(
                    f"principal {name!r} owns {p.usage.space} bytes and {p.usage.inodes} "
                    "inodes: say where they go (--move-to PRINCIPAL)")
            # The heir is charged what p held: the caller must administer it too, or
            # it could hand its usage to anyone (quota evasion).
            heir = self.get_for(move_to, caller_uid, "move storage to")
            if heir is p:
                raise PrincipalError("cannot move storage to the principal being removed")
            # Move the charge: into heir's chain (which must have room), out of p's.
            held = accounting.storage(p.usage.space, p.usage.inodes)
            accounting.apply(p, {k: -v for k, v in held.items()})
            try:
                accounting.charge(heir, held)
            except QuotaExceeded:
                accounting.apply(p, held)  # undo: p keeps it
                raise
        self._uninsert(p)
        self._provisional.discard(p)
        self._processes.forget(p)
        if save:
            self.save()
        self._changed()
        return heir

    # -- charging (accounting.py) --------------------------------------------------------

    def charge(self, p: Principal, *, space: int = 0, inodes: int = 0) -> None:
        """Charge storage to p and its ancestors, or raise QuotaExceeded and change nothing."""
        accounting.charge(p, accounting.storage(space, inodes))
        if (space > 0 or inodes > 0) and self._provisional:
            # First storage of a uid-N default: it exists from now on, saved before
            # the metadata commit that tags storage with its id.
            if self._keep(p):
                self.save()

    def refund(self, p: Principal, *, space: int = 0, inodes: int = 0) -> None:
        accounting.apply(p, accounting.storage(-space, -inodes))

    def charge_object(self, p: Principal, kind: str, n: int = 1) -> None:
        """`n` more of kernel object `kind` (one of OBJECT_BANKS) held by p, charged to it
        and its ancestors; or TooManyObjects and nothing changed."""
        accounting.charge(p, accounting.kernel_object(kind, n))

    def check_object(self, p: Principal, kind: str, n: int = 1) -> None:
        """TooManyObjects if `charge_object` of the same would be refused now; nothing
        changes either way (for an operation that must know before it makes
        anything: a create that opens the file it makes)."""
        accounting.check(p, accounting.kernel_object(kind, n))

    def refund_object(self, p: Principal, kind: str, n: int = 1) -> None:
        accounting.apply(p, accounting.kernel_object(kind, -n))

    def reset_storage_usage(self) -> None:
        accounting.recount_storage(self.walk(), ())

    def recount_storage(self, held: Iterable[tuple[int, int, int]]) -> None:
        """Storage usage of every principal from what the volume holds: `held` gives
        (principal id, space, inodes) of what each holds itself (an id no longer in
        the table counts for root); ancestors count their descendants'."""
        accounting.recount_storage(self.walk(), ((self.by_id(pid), space, inodes)
                                                 for pid, space, inodes in held))

    def _keep(self, p: Principal) -> bool:
        """Make provisional defaults in p's chain permanent; True if there were any."""
        kept = False
        for q in p.chain():
            if q in self._provisional:
                self._provisional.discard(q)
                kept = True
        return kept

    # -- identity and views for other users ----------------------------------------------

    def _is_default(self, p: Principal, uid: int) -> bool:
        """Whether p can be uid's default principal: directly under root, owned by it."""
        return p.parent is self.root and p.owner_uid == uid

    def default_for_uid(self, uid: int) -> Principal:
        if uid == 0:
            return self.root
        name = _default_name(uid)
        p = self._by_name.get(name)
        if p is not None and not self._is_default(p, uid):
            # `uid-N` taken by someone else's principal (a volume from before uid-N
            # names were reserved): never act for it; the uid gets a default of its own.
            if uid not in self._squatted_warned:
                self._squatted_warned.add(uid)
                log.warning("principal %r (under %r, owner uid %d) is not uid %d's default "
                            "principal: uid %d's processes act for %r instead; root may "
                            "remove %r (principal rm --move-to) to give the name back",
                            name, p.parent.name if p.parent else None, p.owner_uid, uid, uid,
                            _fallback_name(uid), name)
            name = _fallback_name(uid)
            p = self._by_name.get(name)
            if p is not None and not self._is_default(p, uid):  # not addable; be sure
                raise NotAllowed(f"uid {uid} has no usable default principal")
        if p is None:
            # Made in memory only: saved when it is first charged storage (charge) or
            # given children or banks; until then nothing of it outlives the daemon.
            p = self._insert(self._take_id(), name, self.root, uid, Banks())
            self._provisional.add(p)
            self._changed()  # the layers below serve it meanwhile (its I/O, its cache)
        return p

    def may_run_as(self, principal: Principal, uid: int) -> bool:
        """Whether `uid` may act for `principal`: root, or the owner of it or of one of
        its ancestors below root."""
        return self._may_administer(principal, uid)

    def listed(self, p: Principal) -> bool:
        """Whether p shows in listings: a provisional default only while it holds
        something (a connection, an open grant)."""
        return p not in self._provisional or any(p.usage.as_dict().values())

    def visible_to(self, uid: int, acting_for: Principal | None = None) -> list[Principal]:
        """The principals `uid` may see listed, in tree order: all for root; for anyone
        else those it may run as (and the one it acts for), with their ancestors, so
        that an EDQUOT from a parent's bank can be explained — not other tenants'."""
        if uid == 0:
            return [p for p in self.walk() if self.listed(p)]
        keep: set[Principal] = set()
        if acting_for is not None:
            keep.update(acting_for.chain())
        for p in self.walk():
            if p not in keep and self.may_run_as(p, uid):
                keep.update(p.chain())
        return [p for p in self.walk() if p in keep and self.listed(p)]

    def context_only(self, rows: Iterable[Principal], uid: int,
                     acting_for: Principal | None = None) -> list[Principal]:
        """Of `rows` (some of `visible_to`'s), those listed only as an ancestor of what
        `uid` may run as (or acts for): shown so that a refusal by one of their banks
        can be explained, but their usage is their whole subtree's — other tenants'
        connections, grants, shared memory — so `info` cuts it to the banks they limit
        (`context`), and `stats` leaves them out of its per-principal activity. None
        for root."""
        if uid == 0:
            return []
        return [p for p in rows if p is not acting_for and not self.may_run_as(p, uid)]

    def info(self, only: Iterable[Principal] | None = None, *,
             context: Collection[Principal] = ()) -> list[PrincipalInfo]:
        """Rows of `principal ls` for `only` (default: all, in tree order). The banks
        are as stored (I/O rates as strings with their units, e.g. "500iops,20MB/s"),
        plus each rate as plain numbers in base units, like every other bank:
        `io_reserve_iops`, `io_reserve_bps`, `io_limit_iops`, `io_limit_bps`
        (operations/s and bytes/s; null where none). The rows of `context` (see
        `context_only`) show usage only against the banks they limit: null elsewhere."""
        return [PrincipalInfo(p.id, p.name, p.parent.name if p.parent else None, p.owner_uid,
                              p.banks.row(), _cut_usage(p) if p in context else
                              _whole_usage(p))
                for p in (self.walk() if only is None else only) if self.listed(p)]

    # -- processes (processes.py) --------------------------------------------------------

    def register(self, pid: int, principal: Principal, *, uid: int, started: int) -> None:
        """Attach process `pid` (authenticated by the caller: it connected as `uid` and
        had start time `started` then) to `principal`; NotAllowed if the process now
        at `pid` is not the one that connected (it exited; the pid was reused)."""
        if not self.may_run_as(principal, uid):
            raise NotAllowed(f"uid {uid} may not run as principal {principal.name!r} "
                             "(only its owner or root may)")
        try:
            self._processes.register(pid, principal, started=started)
        except ProcessLookupError:
            raise NotAllowed(f"process {pid}, which opened this connection, has exited: "
                             "only it may register (a process with its pid now is "
                             "another)") from None

    def resolve(self, pid: int, uid: int, *, now: float | None = None) -> Principal:
        """The principal process `pid` (of `uid`) acts for."""
        p = self._processes.resolve(pid, uid=uid, now=now)
        return p if p is not None else self.default_for_uid(uid)

    def prune_registrations(self) -> None:
        """Forget registrations of processes that exited."""
        self._processes.prune()

    def registered(self) -> dict[int, str]:
        return {pid: p.name for pid, p in self._processes.items()}


def _whole_usage(p: Principal) -> dict[str, int | None]:
    return {**p.usage.as_dict()}


def _cut_usage(p: Principal) -> dict[str, int | None]:
    """p's usage where p has a bank of that name (what a refusal by it is measured
    against), null where it has none (there it is only the sum of others' use)."""
    return {k: (v if getattr(p.banks, k, None) is not None else None)
            for k, v in p.usage.as_dict().items()}

"""Replication: keep each rank's state on a partner rank, in memory and on disk.

API (re-exported from :mod:`aiostage`)::

    stager = ReplicationStager(pg=None, timeout=timedelta(minutes=30),
                               device=torch.device("cpu"), storage_dir=None,
                               *, device_meshes=())
    replica = await stager.stage(state)      # the partner's state, persisted here
    mine = await stager.recover(pg=None)     # my state back from my partner's memory
    await stager.close()                     # or ``async with ReplicationStager() as s``

    state = await load_replica(storage_dir, rank, *, verify=True,
                               safe_globals=None, weights_only=True)
    path = find_replica(storage_dir, rank)

Pairs: rank ``r`` of a group of even size ``W`` pairs with
``(r + W // 2) % W``; the lower rank sends first.  Rank ``r`` keeps its
partner ``p``'s state in ``storage_dir/rank_{r}_replica_partner_{p}.pt``
(global ranks), replaced atomically on every ``stage()``.

Recovery, two ways:

* **From the file** (no live partner needed): a restarted rank ``r`` calls
  ``await load_replica(storage_dir, r)``, which finds
  ``rank_{p}_replica_partner_{r}.pt`` and reads it with :func:`aiostage.load`
  (CRC-checked, ``weights_only``).  ``storage_dir`` must be visible to ``r``
  (shared storage, or the same host).
* **From the partner's memory** over the process group: both ranks of the
  pair call ``await stager.recover()``.  Each sends what it holds of the
  other (its last received replica, or, in a restarted process, its own
  replica file in ``storage_dir``) and receives its own state back, or
  ``None`` when the partner holds nothing.  After a failure that left the
  old group's connection closed, pass a fresh group: ``recover(pg=new)``.

See :mod:`aiostage._replicate._transport` for the wire format and the trust
model of the metadata, and :mod:`aiostage._replicate._stager` for the steps
of one ``stage()``.
"""

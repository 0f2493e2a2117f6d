import subprocess, sys
def head(p): return subprocess.run(["git","show","HEAD:"+p],capture_output=True,text=True,check=True,cwd="/work/main").stdout
def rep(s, old, new):
    assert s.count(old)==1, (old[:60], s.count(old))
    return s.replace(old,new)
out={}
# scp.py
p='dicomnode/net/scp.py'; s=head(p)
s=rep(s,'from dicomnode.config import NodeSettings\n','from dicomnode.config import NodeSettings, Remote\n')
s=rep(s,'from dicomnode.net import patches, status\n','from dicomnode.net import patches, status\nfrom dicomnode.net.qr import QueryRetrieveSCP\n')
s=rep(s,'from dicomnode.spool.store import Spool, StoreOutcome, read_header\n','from dicomnode.spool.query import Catalog\nfrom dicomnode.spool.store import Spool, StoreOutcome, read_header\n')
s=rep(s,'''    """Runs the node's listening AE: C-ECHO, and C-STORE into the spool."""
''','''    """Runs the node's listening AE: C-ECHO, C-STORE into the spool and, given a
    ``catalog``, Query/Retrieve (C-FIND, C-GET, C-MOVE to ``remotes``: :mod:`.qr`)."""
''')
s=rep(s,'''        audit: AuditLog | None = None,
    ) -> None:
        patches.check_pynetdicom()
        self.settings = settings
        self.spool = spool
        self.audit = audit or AuditLog(None)
''','''        audit: AuditLog | None = None,
        *,
        catalog: Catalog | None = None,
        remotes: tuple[Remote, ...] = (),
    ) -> None:
        patches.check_pynetdicom()
        self.settings = settings
        self.spool = spool
        self.audit = audit or AuditLog(None)
        self.qr = (
            None
            if catalog is None
            else QueryRetrieveSCP(settings, catalog, remotes, self.audit, self._caller_allowed)
        )
''')
s=rep(s,'''        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae
''','''        # With Q/R, a C-GET caller may take the SCP role for storage (PS3.7 D.3.3.4).
        role = {"scu_role": True, "scp_role": True} if self.qr is not None else {}
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES, **role)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        if self.qr is not None:
            for sop_class in self.qr.sop_classes():
                ae.add_supported_context(sop_class, self.qr.transfer_syntaxes())
        return ae
''')
s=rep(s,'''            (evt.EVT_ABORTED, self._log_association),
        ]
''','''            (evt.EVT_ABORTED, self._log_association),
        ]
        if self.qr is not None:
            handlers += [
                (evt.EVT_C_FIND, self.qr.handle_find),
                (evt.EVT_C_MOVE, self.qr.handle_move),
                (evt.EVT_C_GET, self.qr.handle_get),
            ]
''')
out[p]=s
# node.py
p='dicomnode/app/node.py'; s=head(p)
s=rep(s,'from dicomnode.spool.index import Index, InstanceHeader\n','from dicomnode.spool.index import Index, InstanceHeader\nfrom dicomnode.spool.query import Catalog\n')
s=rep(s,'''        self.scp = StorageSCP(config.node, self.spool, audit=self.audit)
''','''        self.catalog = Catalog(self.index, results_root(config.node.data_dir), self._job_state)
        self.scp = StorageSCP(
            config.node, self.spool, audit=self.audit, catalog=self.catalog, remotes=config.remotes
        )
''')
s=rep(s,'''    @property
    def port(self) -> int:
        return self.scp.port
''','''    @property
    def port(self) -> int:
        return self.scp.port

    def _job_state(self, job_id: int) -> str | None:
        """A job's state, shown by Query/Retrieve as its results' processing state."""
        try:
            return str(self.jobs.get(job_id).state)
        except KeyError:
            return None
''')
out[p]=s
# conformance
p='docs/conformance.md'; s=head(p)
marker='## 3. AE specification: SCU (delivery of results)'
s=rep(s,marker,open('/tmp/qr_section.md').read()+'\n'+marker)
out[p]=s
# db.py: HEAD + my migration appended at the end of MIGRATIONS
p='dicomnode/db.py'; s=head(p); w=open('/work/main/'+p).read()
fn=w[w.index('def _v5_query_attributes'):w.index('#: Step ``i`` upgrades')]
s=rep(s,'#: Step ``i`` upgrades', fn+'#: Step ``i`` upgrades')
import re
m=re.search(r'MIGRATIONS: tuple\[.*?\] = \((.*?)\n\)', s, re.S)
entries=[e.strip().rstrip(',') for e in m.group(1).split('\n') if e.strip()]
if entries[-1]!='_v4_job_priorities':
    print("db.py: HEAD's last migration is", entries[-1], "-- v4 not committed yet", file=sys.stderr)
s=s[:m.end()-2]+'\n    _v5_query_attributes,\n)'+s[m.end():]
out[p]=s
for p,s in out.items():
    open('/tmp/mine/'+p.replace('/','__'),'w').write(s)
print("built", list(out))

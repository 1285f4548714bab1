"""The tenant layout (deploy/README.md, "Tenancy on the bus") and the callout's tenant grants,
checked without a server: ids, subjects and keys carry the tenant as a whole token; a job of no
tenant keeps the old layout; every grant names the tenant before any wildcard (a wildcard in a
published subject is served like a token: test_tenancy.py attacks the running server)."""
from __future__ import annotations

import re

import pytest

from captionbus.authcallout import ConfError, connection_permissions, read_conf, read_users, tenant_permissions
from captionbus.contracts import NO_TENANT, new_job_id, subjects, tenant_of
from captionbus.core.bus import USER_INFO
from captionbus.core.tenancy import granted_tenant

NATS_DEPLOY = __import__("pathlib").Path(__file__).resolve().parents[2] / "deploy" / "nats"
ROLES = NATS_DEPLOY / "roles.conf"


def test_a_tenants_job_id_subjects_and_key_carry_the_tenant_as_a_token():
    job = new_job_id("acme")
    assert job.startswith("acme_j") and tenant_of(job) == "acme"
    p = subjects.job_partition(job)
    assert subjects.job_event(job, "submitted") == f"captionbus.job.acme.{p}.{job}.submitted"
    assert subjects.job_events(job) == f"captionbus.job.acme.{p}.{job}.*"
    assert subjects.legacy_job_event(job, "submitted") == f"captionbus.job.acme.{job}.submitted"
    assert subjects.job_key(job) == f"acme.{job}" and subjects.job_id_of_key(f"acme.{job}") == job
    assert subjects.event_job_id(subjects.job_event(job, "completed")) == job
    assert subjects.tenant_events("acme") == "captionbus.job.acme.>" and subjects.tenant_keys("acme") == "acme.>"
    assert subjects.tenant_records("acme") == "acme.*"


@pytest.mark.parametrize("job", ["j19a-3f2c", "job-victim", "_x", "Acme_j1", "-a_j1", pytest.param(new_job_id(), id="a-new-id")])
def test_a_job_of_no_tenant_keeps_its_key_and_has_its_events_under_no_tenant(job):
    assert tenant_of(job) == NO_TENANT
    assert subjects.job_event(job, "submitted") == f"captionbus.job._.{subjects.job_partition(job)}.{job}.submitted"
    assert subjects.legacy_job_event(job, "submitted") == f"captionbus.job.{job}.submitted"
    assert subjects.job_key(job) == job and subjects.job_id_of_key(job) == job
    assert subjects.event_job_id(subjects.job_event(job, "failed")) == job


def test_trusted_readers_filter_every_layout():
    assert subjects.job_kind_all_jobs("completed") == [
        "captionbus.job.*.*.*.completed", "captionbus.job.*.completed", "captionbus.job.*.*.completed"]
    assert "captionbus.job.*.*.submitted" in subjects.legacy_coordinator_filters()
    assert len(subjects.legacy_coordinator_filters()) == 2 * len(subjects.COORDINATOR_KINDS)


@pytest.mark.parametrize("bad", ["-a", "A", "a.b", "a*", "a_b", "x" * 33])
def test_a_tenant_name_is_one_plain_token(bad):
    with pytest.raises(ValueError):
        new_job_id(bad)
    with pytest.raises(ValueError):
        subjects.tenant_events(bad)


def test_every_tenant_grant_names_the_tenant_before_any_wildcard():
    """Publish grants that reach job data (events, job state, artifacts) hold the tenant token ahead
    of the first `*` or `>`; the only grants with a wildcard and no tenant are flow control. No
    `$SRV` (workers' state names every tenant's jobs), no CONSUMER.INFO or DELETE (a consumer's
    name is one token: no grant holds them to the tenant's own)."""
    grants = tenant_permissions("acme", "_INBOX_acme_x")
    assert grants["sub"] == {"allow": ["_INBOX_acme_x.>"]}
    reach = [s for s in grants["pub"]["allow"] if re.search(r"captionbus\.job|cb_jobs|CB_EVENTS|cb_artifacts", s)
             and not s.startswith("$JS.FC.")]
    assert len(reach) == 13, reach  # 3 event kinds in 2 layouts, 2 job-state reads, 1 event follow, 4 artifact grants
    untenanted = set(grants["pub"]["allow"]) - set(reach)
    assert all(s.startswith("$JS.FC.") or "*" not in s and ">" not in s for s in untenanted), untenanted
    assert not [s for s in grants["pub"]["allow"] if s.startswith(("$SRV", "$JS.API.CONSUMER.INFO",
                                                                  "$JS.API.CONSUMER.DELETE", "$JS.API.CONSUMER.LIST",
                                                                  "$JS.API.CONSUMER.NAMES"))]
    for subject in reach:
        tokens = subject.split(".")
        start = 0
        if subject.startswith("$JS.API.CONSUMER.CREATE."):  # <stream>.<name>.<filter>: the name names, never filters
            assert tokens[5] == "*", subject
            start = 6
        first_wildcard = min((i for i, t in enumerate(tokens) if t in ("*", ">") and i >= start), default=len(tokens))
        assert "acme" in tokens[start:first_wildcard], subject
    assert not [s for s in grants["pub"]["allow"] if "MSG.GET" in s]
    assert not [s for s in grants["pub"]["allow"] if s.startswith("$JS.API.STREAM.INFO.") and
                s.rsplit(".", 1)[1] in ("KV_cb_jobs", "CB_EVENTS", "OBJ_cb_artifacts")]
    # the coordinators' consumers (before job ownership, and each partition's) cannot be rewritten
    assert grants["pub"]["deny"] == [f"$JS.API.CONSUMER.CREATE.CB_EVENTS.{name}.>" for name in (
        "coordinator", *subjects.partition_consumers())]


def test_the_tenant_a_login_acts_for_is_the_one_its_grants_submit_for():
    """captionbus.core.bus.client_tenant reads the server's grants: a tenant's name only what the
    callout grants it, every other role none (whatever its user is called)."""
    assert granted_tenant(tenant_permissions("acme", "_INBOX_acme_x")["pub"]["allow"]) == "acme"
    for user, account in read_users(NATS_DEPLOY / "accounts.conf").items():
        if account.tenant is None:
            granted = connection_permissions(account.permissions, f"_INBOX_{user}_x")["pub"]["allow"]
            assert granted_tenant(granted) is None, user
            assert USER_INFO in granted, user  # every login may ask what it was granted
    assert granted_tenant(["captionbus.job.*.*.submitted", "captionbus.job.*.submitted"]) is None
    with pytest.raises(ValueError, match="several tenants"):
        granted_tenant(["captionbus.job.acme.*.submitted", "captionbus.job.beta.*.submitted"])


def test_a_client_user_is_a_tenant_of_its_name_and_must_be_able_to_name_one(tmp_path):
    conf = tmp_path / "accounts.conf"
    (tmp_path / "roles.conf").write_text(ROLES.read_text())
    users = '{user: acme, password: a, permissions: $CLIENT}\n    {user: worker, password: w, permissions: $WORKER}'
    conf.write_text(f"include ./roles.conf\nauthorization {{\n  users: [\n    {users}\n  ]\n}}\n")
    read = read_users(conf)
    assert read["acme"].tenant == "acme" and read["worker"].tenant is None
    conf.write_text(conf.read_text().replace("user: acme", "user: Acme.Corp"))
    with pytest.raises(ConfError, match="names its tenant"):
        read_users(conf)


def test_a_user_given_a_copy_of_the_client_block_is_a_tenant_too(tmp_path):
    """Tenancy by what a block grants, not by which variable names it: an inline copy of CLIENT
    (reordered, a lone subject unlisted, its own reply prefix) is a tenant, so the callout grants
    it tenant_permissions, not the static client's reading of every job. A block that grants
    something else is granted as written."""
    (tmp_path / "roles.conf").write_text(ROLES.read_text())
    client = read_conf(tmp_path / "roles.conf")["CLIENT"]
    publish = list(reversed(client["publish"]["allow"]))
    denied = ", ".join(f'"{s}"' for s in client["publish"]["deny"])

    def block(allow, sub='"_INBOX_copy.>"'):
        listed = ", ".join(f'"{s}"' for s in allow)
        return f"{{publish: {{allow: [{listed}], deny: [{denied}]}}, subscribe: {{allow: {sub}}}}}"

    users = (f"{{user: copy, password: a, permissions: {block(publish)}}}\n"
             f"    {{user: more, password: b, permissions: {block(publish + ['captionbus.req.*'])}}}\n"
             "    {user: acme, password: c, permissions: $CLIENT}")
    conf = tmp_path / "accounts.conf"
    conf.write_text(f"include ./roles.conf\nauthorization {{\n  users: [\n    {users}\n  ]\n}}\n")
    read = read_users(conf)
    assert read["copy"].tenant == "copy" and read["acme"].tenant == "acme" and read["more"].tenant is None



def test_an_artifact_store_scoped_to_no_tenant_is_the_shared_namespace(tmp_path):
    """ArtifactStore.scoped maps NO_TENANT (what tenant_of says of a job id without one) itself:
    the stage runtime scopes every request's store by its job id, tenant or not."""
    import nats

    from captionbus.core.artifacts import ArtifactStore
    from captionbus.core.settings import Settings

    store = ArtifactStore(Settings(home=tmp_path, artifacts_mode="object"), nats.NATS().jetstream())
    assert store.scoped(NO_TENANT) is store and store.scoped(None) is store
    acme = store.scoped(tenant_of(new_job_id("acme")))
    assert acme is not store and acme.tenant == acme.objects.tenant == "acme"
    assert acme.objects._meta_subject("k").startswith("$O.cb_artifacts.M.acme.")
    back = acme.scoped(NO_TENANT)
    assert back.tenant is None and back.objects.tenant is None
    assert back.objects._meta_subject("k") == store.objects._meta_subject("k")

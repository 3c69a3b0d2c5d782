//! The admin service: profiles, ports, hosts, migrations and the chassis
//! view, each call checked whole and committed under the chassis lock.

use dvs_proto::api;
use dvs_proto::PortId;
use tonic::{Request, Response, Status};

use super::views::doc_view;
use super::Controller;
use crate::chassis::{Attach, Kind};

pub(super) fn parse_port(id: &str) -> Result<PortId, Status> {
    id.parse::<PortId>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

pub(super) fn attach(tap: &str, netdev: &str, later: bool) -> Result<Attach, Status> {
    match (tap.is_empty(), netdev.is_empty(), later) {
        (false, true, false) => Ok(Attach::Tap(tap.to_string())),
        (true, false, false) => Ok(Attach::Netdev(netdev.to_string())),
        (true, true, true) => Ok(Attach::Unnamed),
        _ => Err(Status::invalid_argument(
            "give exactly one of --tap NAME (the agent creates the TAP), --netdev IFACE (an interface the VMM makes, now or later) or --netdev-later (the VMM names it later)",
        )),
    }
}

impl Controller {
    /// Port `id` as the admin service shows it.
    fn port_reply(&self, id: PortId) -> Result<Response<api::Port>, Status> {
        let st = self.lock();
        let p = st
            .chassis
            .port(id)
            .ok_or_else(|| Status::not_found(format!("no port {id}")))?;
        Ok(Response::new(self.port_view(&st, p)))
    }
}

#[tonic::async_trait]
impl api::admin_server::Admin for Controller {
    async fn apply_profiles(
        &self,
        req: Request<api::ApplyRequest>,
    ) -> Result<Response<api::ApplyReply>, Status> {
        let r = req.into_inner();
        let changes = self.mutate(true, |c| c.apply(&r.yaml, r.dry_run))?;
        Ok(Response::new(api::ApplyReply {
            applied: !r.dry_run && !changes.is_empty(),
            changes,
            revision: self.lock().chassis.revision(),
        }))
    }

    async fn list_profiles(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::ProfileList>, Status> {
        let st = self.lock();
        let profiles = st
            .chassis
            .docs()
            .map(|d| doc_view(&st.chassis, d))
            .collect();
        Ok(Response::new(api::ProfileList { profiles }))
    }

    async fn get_profile(&self, req: Request<api::Name>) -> Result<Response<api::Profile>, Status> {
        let name = req.into_inner().name;
        let st = self.lock();
        let d = Kind::ALL
            .into_iter()
            .find_map(|k| st.chassis.doc(k, &name))
            .ok_or_else(|| {
                Status::not_found(format!("no profile, monitor or private VLAN `{name}`"))
            })?;
        Ok(Response::new(doc_view(&st.chassis, d)))
    }

    async fn delete_profile(
        &self,
        req: Request<api::Name>,
    ) -> Result<Response<api::ApplyReply>, Status> {
        let name = req.into_inner().name;
        let kind = {
            let st = self.lock();
            Kind::ALL
                .into_iter()
                .find(|k| st.chassis.doc(*k, &name).is_some())
                .unwrap_or(Kind::PortProfile)
        };
        let changes = self.mutate(true, |c| c.delete_doc(kind, &name))?;
        Ok(Response::new(api::ApplyReply {
            changes,
            applied: true,
            revision: self.lock().chassis.revision(),
        }))
    }

    async fn create_port(
        &self,
        req: Request<api::CreatePortRequest>,
    ) -> Result<Response<api::Port>, Status> {
        let r = req.into_inner();
        let bind = if r.host.is_empty() {
            if !r.tap.is_empty() || !r.netdev.is_empty() {
                return Err(Status::invalid_argument(
                    "--tap/--netdev need --host: the host the port goes on",
                ));
            }
            None
        } else {
            Some(attach(&r.tap, &r.netdev, false)?)
        };
        let id = self.mutate(true, |c| {
            // Checked whole: a bad binding leaves no port behind.
            let mut next = c.clone();
            let id = next.create_port(&r.vm, &r.mac, &r.profile, &r.ips)?;
            if let Some(a) = bind {
                next.bind_port(id, &r.host, a)?;
            }
            *c = next;
            Ok(id)
        })?;
        let st = self.lock();
        let p = st
            .chassis
            .port(id)
            .ok_or_else(|| Status::internal("the new port vanished"))?;
        Ok(Response::new(self.port_view(&st, p)))
    }

    async fn list_ports(&self, _: Request<api::Empty>) -> Result<Response<api::PortList>, Status> {
        let st = self.lock();
        let ports = st.chassis.ports().map(|p| self.port_view(&st, p)).collect();
        Ok(Response::new(api::PortList { ports }))
    }

    async fn get_port(&self, req: Request<api::PortRef>) -> Result<Response<api::Port>, Status> {
        self.port_reply(parse_port(&req.into_inner().id)?)
    }

    async fn delete_port(
        &self,
        req: Request<api::PortRef>,
    ) -> Result<Response<api::Empty>, Status> {
        let id = parse_port(&req.into_inner().id)?;
        self.mutate(true, |c| c.delete_port(id))?;
        Ok(Response::new(api::Empty {}))
    }

    async fn bind_port(
        &self,
        req: Request<api::BindPortRequest>,
    ) -> Result<Response<api::Port>, Status> {
        let r = req.into_inner();
        let id = parse_port(&r.id)?;
        if r.host.is_empty() {
            self.mutate(true, |c| c.unbind_port(id))?;
        } else {
            let a = attach(&r.tap, &r.netdev, r.netdev_later)?;
            self.mutate(true, |c| c.bind_port(id, &r.host, a))?;
        }
        self.port_reply(id)
    }

    async fn set_port_ips(
        &self,
        req: Request<api::SetPortIpsRequest>,
    ) -> Result<Response<api::Port>, Status> {
        let r = req.into_inner();
        let id = parse_port(&r.id)?;
        self.mutate(true, |c| c.set_port_ips(id, &r.ips))?;
        self.port_reply(id)
    }

    async fn drain_host(
        &self,
        req: Request<api::DrainHostRequest>,
    ) -> Result<Response<api::Host>, Status> {
        let r = req.into_inner();
        self.mutate(true, |c| c.drain_host(&r.host, !r.off))?;
        let st = self.lock();
        let host = self
            .host_views(&st)
            .into_iter()
            .find(|h| h.name == r.host)
            .ok_or_else(|| Status::not_found(format!("no host `{}`", r.host)))?;
        Ok(Response::new(host))
    }

    async fn remove_host(&self, req: Request<api::Name>) -> Result<Response<api::Empty>, Status> {
        let host = req.into_inner().name;
        if self.lock().sessions.contains_key(&host) {
            return Err(Status::failed_precondition(format!(
                "host {host}'s agent is connected: stop it first (a running agent registers the host again)"
            )));
        }
        self.mutate(true, |c| c.remove_host(&host))?;
        Ok(Response::new(api::Empty {}))
    }

    async fn list_hosts(&self, _: Request<api::Empty>) -> Result<Response<api::HostList>, Status> {
        let st = self.lock();
        Ok(Response::new(api::HostList {
            hosts: self.host_views(&st),
        }))
    }

    async fn start_migration(
        &self,
        req: Request<api::StartMigrationRequest>,
    ) -> Result<Response<api::Migration>, Status> {
        self.begin(req.into_inner()).await.map(Response::new)
    }

    async fn activate_migration(
        &self,
        req: Request<api::MigrationRef>,
    ) -> Result<Response<api::Migration>, Status> {
        self.activate(req.into_inner()).await.map(Response::new)
    }

    async fn abort_migration(
        &self,
        req: Request<api::MigrationRef>,
    ) -> Result<Response<api::Migration>, Status> {
        self.abort(req.into_inner()).await.map(Response::new)
    }

    async fn list_migrations(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::MigrationList>, Status> {
        Ok(Response::new(self.migration_list()))
    }

    async fn show_chassis(&self, _: Request<api::Empty>) -> Result<Response<api::Chassis>, Status> {
        let st = self.lock();
        Ok(Response::new(api::Chassis {
            revision: st.chassis.revision(),
            hosts: self.host_views(&st),
            ports: st.chassis.ports().map(|p| self.port_view(&st, p)).collect(),
        }))
    }
}

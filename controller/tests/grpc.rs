//! The controller's services against bad input over real gRPC (loopback):
//! every refusal has a status and a message that names the problem, and
//! the chassis does not change.

#![allow(clippy::unwrap_used)]

mod common;

use dvs_controller::server::{serve_on, Controller};
use dvs_proto::api::{self, admin_client::AdminClient, agent_client::AgentClient, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

struct Running {
    url: String,
    controller: Controller,
    dir: std::path::PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(tag: &str) -> Running {
    let dir = std::env::temp_dir().join(format!("dvs-grpc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let controller = Controller::open(&dir).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_on(controller.clone(), listener, None, async {
        let _ = stopped.await;
    }));
    let r = Running {
        url,
        controller,
        dir,
        _stop: stop,
    };
    common::seed(&r.url).await;
    r
}

fn msg(m: agent_message::Msg) -> api::AgentMessage {
    api::AgentMessage { msg: Some(m) }
}

fn register(host: &str, ip: &str) -> api::AgentMessage {
    msg(agent_message::Msg::Register(api::Register {
        host: host.into(),
        tunnel_ip: ip.into(),
        revision: 0,
    }))
}

/// Open a session that first sends `first`; the status if refused.
async fn session(
    url: &str,
    first: api::AgentMessage,
) -> Result<
    (
        mpsc::Sender<api::AgentMessage>,
        tonic::Streaming<api::ControllerMessage>,
    ),
    tonic::Status,
> {
    let mut c = AgentClient::connect(url.to_string()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let s = c.session(ReceiverStream::new(rx)).await?;
    Ok((tx, s.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agent_sessions_are_refused_and_change_nothing() {
    let r = start("agent").await;
    let before = r.controller.snapshot().revision();

    let e = session(
        &r.url,
        msg(agent_message::Msg::Ack(api::Ack { revision: 1 })),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "the first message of a session must be Register"
    );

    let e = session(&r.url, register("h1", "not-an-ip"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "tunnel_ip `not-an-ip` is not an IP address");

    let e = session(&r.url, register("h 1", "10.0.0.1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("host name `h 1` is not valid"),
        "{}",
        e.message()
    );
    assert_eq!(
        r.controller.snapshot().revision(),
        before,
        "nothing changed"
    );

    // h1 connects; another agent claiming h1 is refused.
    let (tx, mut inbound) = session(&r.url, register("h1", "10.0.0.1")).await.unwrap();
    let full = inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        full.msg,
        Some(api::controller_message::Msg::Full(ref f)) if f.items.iter().any(|i| i.key == "port/veth1")
    ));
    let e = session(&r.url, register("h1", "10.0.0.9"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        e.message().contains("host h1 is connected already")
            && e.message().contains("another agent claims its name"),
        "{}",
        e.message()
    );
    // A host may not take h1's tunnel address.
    let e = session(&r.url, register("h2", "10.0.0.1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.message(), "tunnel address 10.0.0.1 is host h1's");

    // An ack from the future ends the session with the reason.
    let rev = r.controller.snapshot().revision();
    tx.send(msg(agent_message::Msg::Ack(api::Ack {
        revision: rev + 100,
    })))
    .await
    .unwrap();
    let e = inbound.message().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        format!(
            "ack of revision {} from the future: the chassis is at {rev}",
            rev + 100
        )
    );
    assert_eq!(r.controller.snapshot().host("h1").unwrap().acked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_calls_are_refused_and_change_nothing() {
    let r = start("admin").await;
    let before = r.controller.snapshot().revision();
    let mut admin = AdminClient::connect(r.url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    // An oversized profile file: refused by the chassis past 1 MiB...
    let big = format!(
        "kind: PortProfile\nname: big\nvlan: {{ mode: access, id: 10 }}\n#{}\n",
        "x".repeat(2 << 20)
    );
    let e = admin
        .apply_profiles(api::ApplyRequest {
            yaml: big,
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("apply at most 1048576"),
        "{}",
        e.message()
    );
    // ...and by the transport past 4 MiB.
    let e = admin
        .apply_profiles(api::ApplyRequest {
            yaml: "x".repeat(8 << 20),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let e = admin
        .get_port(api::PortRef {
            id: "port-one".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "port ID `port-one` is not valid: expected vethN with N in 1..=4294967295"
    );
    let e = admin
        .delete_port(api::PortRef {
            id: "veth99".into(),
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, "no port veth99"));
    let e = admin
        .bind_port(api::BindPortRequest {
            id: "veth1".into(),
            host: "h1".into(),
            tap: "t1".into(),
            netdev: "eth9".into(),
            netdev_later: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("give exactly one of --tap"),
        "{}",
        e.message()
    );
    let e = admin
        .create_port(api::CreatePortRequest {
            vm: "vm2".into(),
            mac: "02:00:00:00:00:02".into(),
            profile: "web".into(),
            host: "h1".into(),
            tap: "t1".into(),
            netdev: String::new(),
            ips: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "interface `t1` on host h1 belongs to port veth1: name another (--tap, --netdev)"
    );
    let snap = r.controller.snapshot();
    assert_eq!(snap.revision(), before, "nothing changed");
    assert_eq!(
        snap.ports().count(),
        1,
        "the refused port was not left behind"
    );
}

//! What the controller's gRPC test files share.

use dvs_proto::api::{self, admin_client::AdminClient};

/// Give the controller at `url` profile `web` (VLAN 10) and port veth1 of
/// VM vm1 (02:00:00:00:00:01) on host h1's TAP t1.
pub async fn seed(url: &str) {
    let mut admin = AdminClient::connect(url.to_string()).await.unwrap();
    admin
        .apply_profiles(api::ApplyRequest {
            yaml: "kind: PortProfile\nname: web\nvlan: { mode: access, id: 10 }\n".into(),
            dry_run: false,
        })
        .await
        .unwrap();
    admin
        .create_port(api::CreatePortRequest {
            vm: "vm1".into(),
            mac: "02:00:00:00:00:01".into(),
            profile: "web".into(),
            host: "h1".into(),
            tap: "t1".into(),
            netdev: String::new(),
            ips: Vec::new(),
        })
        .await
        .unwrap();
}

//! A small real VXLAN overlay cluster in network namespaces, for the privileged integration
//! tests, `cargo xtask lab` and the benchmarks.
//!
//! ```text
//!   netns <id>-underlay:  br0 ── n1 ─┐  n2 ─┐  n3 ─┐          (192.168.77.0/24)
//!   netns <id>-k8s01:     eth0 192.168.77.1   vxlan.calico (VTEP /32, Felix MAC), pods /32 on lo
//!   netns <id>-k8s02:     eth0 192.168.77.2   …
//! ```
//! Every node gets, per remote node R, what Felix (or flanneld) programs: block routes
//! `via V_R dev <device> onlink`, a permanent neighbour `V_R → M_R`, an FDB entry
//! `M_R dst N_R`; Calico nodes also blackhole their own blocks. [`Lab::inject`] breaks that the
//! ways it breaks in production, [`Lab::traffic`] sends real UDP packets pod → pod, and dropping
//! the [`Lab`] deletes every namespace (also while unwinding from a panic).
//!
//! Everything needs root. Shelling out to `ip`/`bridge` is deliberate: this is test
//! infrastructure and must stay independent of the agent's own netlink code.

mod dual_stack;
pub mod fake_apiserver;
mod fault;
pub mod kube_fixture;
mod lab;
pub mod receiver;
mod shapes;
mod spec;
mod sys;
mod traffic;

pub use dual_stack::{Ipv6InjectedFault, Ipv6Node, DEVICE_V6, OVERLAY_MTU_V6};
pub use fault::{Fault, InjectedFault};
pub use lab::{Lab, NodeDataplane, NodeInfo, NETNS_DIR, NETNS_PREFIX, OVERLAY_MTU, UNDERLAY_IF};
pub use spec::{LabSpec, Mac, NodeSpec, Profile};
pub use traffic::{DestinationReport, TrafficReport};

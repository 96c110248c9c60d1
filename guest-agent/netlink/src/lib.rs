//! What the shim (on the host) and the guest agent (in the guest) both need to know
//! of rtnetlink, beside the message types of `netlink-packet-route`: the kernel's
//! rules for an interface name, and where its words about a failure are in an error
//! reply. Both talk netlink over a plain blocking socket of their own.
//!
//! ```
//! assert_eq!(peapod_netlink::check_ifname("eth0"), Ok(()));
//! assert!(peapod_netlink::check_ifname("a/b").is_err());
//! ```

use netlink_packet_core::{NlasIterator, NLM_F_ACK_TLVS, NLM_F_CAPPED};

/// The size of a `struct nlmsghdr`.
pub const NETLINK_HEADER_LEN: usize = 16;
/// The longest interface name the kernel takes (`IFNAMSIZ` less its NUL).
pub const MAX_IFNAME_BYTES: usize = 15;
/// `NLMSGERR_ATTR_MSG`: the extended ACK's text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// The kernel's rules for a network interface name (`dev_valid_name`): `Err` says
/// what is wrong with it, to follow the name in a message.
pub fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name.len() > MAX_IFNAME_BYTES {
        Err("is longer than 15 bytes, the kernel's limit")
    } else if name == "." || name == ".." {
        Err("is not a valid interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Err("has a '/', ':', space or control character, which the kernel refuses")
    } else {
        Ok(())
    }
}

/// The kernel's words about a failure (`NLMSGERR_ATTR_MSG` of an extended ACK), from
/// an error reply's `flags` and its payload after the error code: the request's
/// header (or the whole request unless capped), then attributes.
pub fn kernel_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let at = if flags & NLM_F_CAPPED != 0 {
        NETLINK_HEADER_LEN
    } else {
        u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?) as usize
    };
    for nla in NlasIterator::new(payload.get(at.next_multiple_of(4)..)?) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let text = nla.value().split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_messages_are_read_from_extended_acks() {
        // An error for a 20-byte request (not capped), then NLMSGERR_ATTR_MSG.
        let mut payload = vec![0u8; 20];
        payload[..4].copy_from_slice(&20u32.to_ne_bytes());
        let text = b"Nexthop has invalid gateway\0";
        let len = 4 + text.len();
        payload.extend_from_slice(&(len as u16).to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        payload.resize(payload.len().next_multiple_of(4), 0);
        assert_eq!(
            kernel_message(NLM_F_ACK_TLVS, &payload).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        assert_eq!(kernel_message(0, &payload), None);
        assert_eq!(
            kernel_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload[4..]).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        assert_eq!(kernel_message(NLM_F_ACK_TLVS, &payload[..22]), None);
    }

    #[test]
    fn interface_names_follow_the_kernels_rules() {
        for good in ["eth0", "tap_0123456789a", "veth-x.1"] {
            assert_eq!(check_ifname(good), Ok(()), "{good}");
        }
        assert_eq!(check_ifname(""), Err("is empty"));
        assert!(check_ifname("a123456789012345")
            .unwrap_err()
            .contains("15 bytes"));
        assert_eq!(check_ifname(".."), Err("is not a valid interface name"));
        for bad in ["a/b", "a:b", "a b", "a\nb"] {
            assert!(
                check_ifname(bad).unwrap_err().contains("'/', ':'"),
                "{bad:?}"
            );
        }
    }
}

//! Measurement only. A plain IMAP-to-IMAP copier written the way async-imap's API leads
//! you to: per folder, `UID FETCH` in batches, then one `append` per message. It exists
//! to put a number on the choice of IMAP client in mailferry's README; it keeps no state
//! and is not part of the product.
//!
//! Usage: async-imap-probe HOST SRC_PORT DST_PORT USER   (password in $PROBE_PASSWORD)

use async_imap::types::{Flag, NameAttribute};
use futures::TryStreamExt;
use tokio::net::TcpStream;

type Session = async_imap::Session<TcpStream>;

async fn login(host: &str, port: u16, user: &str, password: &str) -> Session {
    let tcp = TcpStream::connect((host, port)).await.expect("connect");
    let mut client = async_imap::Client::new(tcp);
    client.read_response().await.expect("greeting");
    client.login(user, password).await.map_err(|(e, _)| e).expect("login")
}

fn flag_text(f: &Flag<'_>) -> Option<String> {
    Some(match f {
        Flag::Seen => "\\Seen".into(),
        Flag::Answered => "\\Answered".into(),
        Flag::Flagged => "\\Flagged".into(),
        Flag::Deleted => "\\Deleted".into(),
        Flag::Draft => "\\Draft".into(),
        Flag::Recent | Flag::MayCreate => return None,
        Flag::Custom(c) => c.to_string(),
    })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (host, src_port, dst_port, user) = (&args[1], args[2].parse().unwrap(), args[3].parse().unwrap(), &args[4]);
    let password = std::env::var("PROBE_PASSWORD").expect("PROBE_PASSWORD");
    let mut src = login(host, src_port, user, &password).await;
    let mut dst = login(host, dst_port, user, &password).await;
    let folders: Vec<(String, bool)> = src
        .list(Some(""), Some("*"))
        .await
        .unwrap()
        .map_ok(|n| (n.name().to_string(), !n.attributes().contains(&NameAttribute::NoSelect)))
        .try_collect()
        .await
        .unwrap();
    let mut copied = 0usize;
    for (folder, selectable) in folders {
        if folder != "INBOX" {
            let _ = dst.create(&folder).await;
        }
        if !selectable {
            continue;
        }
        let mailbox = src.examine(&folder).await.unwrap();
        if mailbox.exists == 0 {
            continue;
        }
        let uids: Vec<u32> = src.uid_search("ALL").await.unwrap().into_iter().collect();
        let mut uids = uids;
        uids.sort_unstable();
        for batch in uids.chunks(100) {
            let set = batch.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            let fetched: Vec<_> = src
                .uid_fetch(set, "(UID FLAGS INTERNALDATE BODY.PEEK[])")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            for m in &fetched {
                let flags: Vec<String> = m.flags().filter_map(|f| flag_text(&f)).collect();
                let date = m
                    .internal_date()
                    .map(|d| format!("\"{}\"", d.format("%d-%b-%Y %H:%M:%S %z")));
                let body = m.body().expect("body");
                dst.append(&folder, Some(&format!("({})", flags.join(" "))), date.as_deref(), body)
                    .await
                    .unwrap();
                copied += 1;
            }
        }
    }
    println!("{user}: copied {copied}");
    let _ = src.logout().await;
    let _ = dst.logout().await;
}

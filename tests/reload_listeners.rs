//! SIGHUP on the gateway changes its proxy listeners and declared forwards live: new
//! ones bind, removed ones stop accepting while their connections finish, a moved one
//! takes its new address, a changed forward keeps its socket; a port in use fails the
//! reload whole.

mod common;

use std::time::Duration;

use common::udp::echo_server;
use common::*;

/// A datagram to `port` comes back from the UDP echo behind it (the first may open
/// the flow while it is sent; each try waits a second).
async fn udp_echoes(port: u16) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        socket
            .send_to(b"through the forward", ("127.0.0.1", port))
            .await
            .unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await
        {
            assert_eq!(&buf[..n], b"through the forward");
            return;
        }
    }
    panic!("no echo through the udp forward on {port}");
}

async fn reload(stack: &Stack, config: &std::path::Path, text: &str, nth: usize) -> String {
    std::fs::write(config, text).unwrap();
    signal(stack.gateway.0.id().unwrap(), "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", nth)
        .await;
    stack.log("gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_and_forwards_change_live_under_downloads_through_each_front_end() {
    let https0 = free_port();
    let https0_block = format!(
        "  https:\n    listen_addr: \"127.0.0.1:{https0}\"\n    auth_username: \"{HTTP_USER}\"\n    auth_password: \"{HTTP_PASS}\"\n"
    );
    let stack = Stack::start(StackOptions {
        gateway_extra: vec!["forwards: []".into()],
        proxy_extra: https0_block.trim_end().to_owned(),
        ..Default::default()
    })
    .await;
    wait_for_port(https0).await;
    let target = http_target().await;
    let echo = echo_target().await;
    let udp_echo = echo_server().await;
    let ca = stack.certs.cert.to_str().unwrap().to_owned();
    // 4096 chunks of 16 KiB, 2 ms apart: 64 MiB over at least 8 s through each front
    // end, all under way before the first reload, and each listener moved or removed
    // while it runs.
    let chunks = SLOW_DOWNLOAD / SLOW_CHUNK;
    let slow = format!("http://{target}/slow/{chunks}/2");
    let downloads: Vec<_> = [
        vec!["-x".to_owned(), stack.http_proxy()],
        vec![
            "--proxy".to_owned(),
            format!(
                "socks5h://{SOCKS_USER}:{SOCKS_PASS}@127.0.0.1:{}",
                stack.socks_port
            ),
        ],
        vec![
            "-x".to_owned(),
            format!("https://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{https0}"),
            "--proxy-cacert".to_owned(),
            ca.clone(),
        ],
    ]
    .into_iter()
    .map(|mut args| {
        args.push(slow.clone());
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&args).await
        })
    })
    .collect();
    wait_for_slow_requests(target, 3).await;
    let mut held = stack.socks5_to(echo).await.unwrap();
    round_trip(&mut held, b"before the reload").await;

    // 1: the HTTP proxy moves, SOCKS5 goes, a TCP forward comes.
    let config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let socks_block = format!(
        "  socks5:\n    listen_addr: \"127.0.0.1:{}\"\n    auth_username: \"{SOCKS_USER}\"\n    auth_password: \"{SOCKS_PASS}\"\n",
        stack.socks_port
    );
    assert!(text.contains(&socks_block), "{text}");
    let (http2, forward) = (free_port(), free_port());
    let tcp_forward = format!(
        "forwards:\n    - {{ listen_addr: \"127.0.0.1:{forward}\", target: \"127.0.0.1:{}\" }}",
        echo.port()
    );
    let first = text
        .replace(
            &format!("127.0.0.1:{}\"", stack.http_port),
            &format!("127.0.0.1:{http2}\""),
        )
        .replace(&socks_block, "")
        .replace("forwards: []", &tcp_forward);
    let log = reload(&stack, &config, &first, 1).await;
    for line in [
        format!(
            "proxy.http moved from 127.0.0.1:{} to 127.0.0.1:{http2}",
            stack.http_port
        ),
        format!("proxy.socks5 on 127.0.0.1:{} removed", stack.socks_port),
        format!("forward 127.0.0.1:{forward} listening"),
    ] {
        assert!(log.contains(&line), "no {line:?} in:\n{log}");
    }
    assert!(!log.contains("takes effect at the next restart"), "{log}");

    let moved = format!("http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{http2}");
    let url = format!("http://{target}/");
    assert_eq!(curl_status(&["-x", &moved, &url]).await, "200");
    refused_within(stack.http_port).await;
    refused_within(stack.socks_port).await;
    // A removed listener's live connection finishes on its own terms.
    round_trip(&mut held, b"after its listener went").await;
    let mut through = tokio::net::TcpStream::connect(("127.0.0.1", forward))
        .await
        .unwrap();
    round_trip(&mut through, b"through the new forward").await;

    // 2: the forward is retargeted on its socket, SOCKS5 comes back on a new address
    // (TCP only), HTTPS moves, and a UDP forward comes.
    let (socks2, https, udp_forward) = (free_port(), free_port(), free_port());
    let socks2_block = format!(
        "  socks5:\n    listen_addr: \"127.0.0.1:{socks2}\"\n    auth_username: \"{SOCKS_USER}\"\n    auth_password: \"{SOCKS_PASS}\"\n    protocols: [tcp]\n"
    );
    let https_block = https0_block.replace(&https0.to_string(), &https.to_string());
    let retargeted = tcp_forward.replace(
        &format!("target: \"127.0.0.1:{}\"", echo.port()),
        &format!("target: \"127.0.0.1:{}\"", target.port()),
    );
    let udp_line = format!(
        "\n    - {{ listen_addr: \"127.0.0.1:{udp_forward}\", target: \"{}\", protocol: udp }}",
        udp_echo.addr
    );
    let second = first
        .replace(&tcp_forward, &format!("{retargeted}{udp_line}"))
        .replace(&https0_block, &format!("{socks2_block}{https_block}"));
    let log = reload(&stack, &config, &second, 2).await;
    for line in [
        format!("forward 127.0.0.1:{forward} changed"),
        format!("proxy.socks5 listening on 127.0.0.1:{socks2}"),
        format!("proxy.https moved from 127.0.0.1:{https0} to 127.0.0.1:{https}"),
        format!("forward 127.0.0.1:{udp_forward} listening"),
    ] {
        assert!(log.contains(&line), "no {line:?} in:\n{log}");
    }
    // The retargeted forward answers HTTP now; the connection made before still echoes.
    let via_forward = format!("http://127.0.0.1:{forward}/");
    assert_eq!(curl_status(&[via_forward.as_str()]).await, "200");
    round_trip(&mut through, b"kept to the old target").await;
    let mut socks = socks5_stream(socks2, SOCKS_USER, SOCKS_PASS, "127.0.0.1", echo.port())
        .await
        .unwrap();
    round_trip(&mut socks, b"through the new socks5").await;
    let secure = format!("https://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{https}");
    assert_eq!(
        curl_status(&["-x", &secure, "--proxy-cacert", &ca, &url]).await,
        "200"
    );
    udp_echoes(udp_forward).await;

    // 3: a forward on a port that is taken fails the whole reload, and the SOCKS5
    // listener it also removes keeps running.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let third = second.replace(&socks2_block, "").replace(
        &udp_line,
        &format!(
            "{udp_line}\n    - {{ listen_addr: \"127.0.0.1:{busy}\", target: \"127.0.0.1:{}\" }}",
            echo.port()
        ),
    );
    std::fs::write(&config, &third).unwrap();
    signal(stack.gateway.0.id().unwrap(), "HUP");
    stack.wait_for_log("gateway", "reload failed", 1).await;
    let log = stack.log("gateway");
    assert!(
        log.contains(&format!(
            "gateway.forwards[2]: cannot listen on 127.0.0.1:{busy}"
        )),
        "{log}"
    );
    let mut socks = socks5_stream(socks2, SOCKS_USER, SOCKS_PASS, "127.0.0.1", echo.port())
        .await
        .unwrap();
    round_trip(&mut socks, b"still listening").await;
    udp_echoes(udp_forward).await;

    let want = sha256_hex(&pattern(SLOW_CHUNK, 7).repeat(chunks));
    for (download, through) in downloads.into_iter().zip(["http", "socks5", "https"]) {
        let (code, got) = tokio::time::timeout(Duration::from_secs(180), download)
            .await
            .expect("the download ends within 180 s")
            .unwrap();
        assert_eq!(code, 0, "the download through {through} was cut");
        assert_eq!(got.len(), SLOW_DOWNLOAD, "through {through}");
        assert_eq!(sha256_hex(&got), want, "through {through}");
    }
}

// Connects N WebSocket clients that each send one join and wait for an answer,
// then prints the server's RSS growth per connection: node client.js URL N PID
// (needs the ws package, e.g. from ../shared/peers/node_modules).
const WebSocket = require('ws');
const fs = require('fs');
const [url, n, pid] = [process.argv[2], +process.argv[3], process.argv[4]];
const rss = () => +fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1];
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  await sleep(500);
  const before = rss(); const socks = [];
  for (let i = 0; i < n; i += 100) {
    await Promise.all(Array.from({ length: Math.min(100, n - i) }, () => new Promise((res, rej) => {
      const ws = new WebSocket(url, { perMessageDeflate: false }); socks.push(ws);
      ws.on('open', () => ws.send(JSON.stringify({ type: 'join', name: 'x', topic: 'idle', ref: 1 })));
      let got = 0; ws.on('message', () => { got++; if (got === 1) res(); }); ws.on('error', rej);
    })));
  }
  await sleep(3000);
  const after = rss();
  console.log(JSON.stringify({ n, before_kib: before, after_kib: after, per_conn_kib: (after - before) / n }));
  process.exit(0);
})();

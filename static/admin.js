// duet admin panel (first version): OTP sign-in, dashboard, take and chat.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  // The served session survives a page reload (sessionStorage), so the panel
  // resumes it: a new socket alone does not keep the customer past the grace.
  let ws = null, ref = 1, resumeRef = null, serving = sessionStorage.getItem('duet_serving'), lastSeq = Number(sessionStorage.getItem('duet_last_seq')) || 0;
  const remember = () => { if (serving) { sessionStorage.setItem('duet_serving', serving); sessionStorage.setItem('duet_last_seq', String(lastSeq)); } else { sessionStorage.removeItem('duet_serving'); sessionStorage.removeItem('duet_last_seq'); } };
  const log = (l) => { const d = $('events'); d.textContent += l + '\n'; d.scrollTop = d.scrollHeight; };
  const post = (path, body) => fetch(path, { method: 'POST', headers: { 'content-type': 'application/json' }, credentials: 'same-origin', body: JSON.stringify(body) });
  const send = (m) => { if (ws && ws.readyState === 1) { m.ref = ref++; ws.send(JSON.stringify(m)); } };
  const row = (cells) => { const tr = document.createElement('tr'); cells.forEach((c) => { const td = document.createElement('td'); td.textContent = c; tr.appendChild(td); }); return tr; };
  function table(id, rows) { const t = $(id); t.replaceChildren(...rows.map(row)); }
  function render(d) {
    table('queues', d.queues.flatMap((q) => q.waiting.map((w) => [q.topic, w.position, w.name, w.waiting_s + ' s'])));
    table('sessions', d.sessions.map((s) => [s.topic, s.customer, s.agent || '', s.node, s.stats ? s.stats.rtt_ms + ' ms' : '']));
    table('agents', d.agents.map((a) => [a.name, a.status, a.node]));
  }
  function connect() {
    ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/admin/ws');
    ws.onopen = () => { $('login').classList.add('hidden'); $('panel').classList.remove('hidden'); if (serving) { resumeRef = ref; send({ type: 'resume', session_id: serving, last_seq: lastSeq }); } };
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (typeof m.seq === 'number' && m.type !== 'ack' && m.session_id === serving) { lastSeq = Math.max(lastSeq, m.seq); remember(); }
      if (m.type === 'dashboard') render(m);
      else if (m.type === 'assigned') { serving = m.session_id; lastSeq = m.seq; remember(); log('· serving ' + m.session_id); }
      else if (m.type === 'message') log(m.from + ': ' + m.text);
      else if (m.type === 'ended') { log('· ended (' + m.reason + ')'); serving = null; remember(); }
      else if (m.type === 'error') { log('! ' + m.code + ': ' + m.message); if (m.ref === resumeRef && serving) { serving = null; remember(); } }
    };
    ws.onclose = (e) => { if (e.code === 1006 || e.code === 1001 || e.code === 1011 || e.code === 1012) setTimeout(connect, 1000); else { $('panel').classList.add('hidden'); $('login').classList.remove('hidden'); } };
  }
  $('request').addEventListener('submit', async (e) => { e.preventDefault(); const r = await post('/admin/otp/request', { admin_id: $('admin_id').value }); $('login_status').textContent = r.status === 202 ? 'Code sent.' : 'Could not send a code (' + r.status + ').'; });
  $('verify').addEventListener('submit', async (e) => { e.preventDefault(); const r = await post('/admin/otp/verify', { admin_id: $('admin_id').value, code: $('code').value }); if (r.ok) connect(); else $('login_status').textContent = 'Refused (' + r.status + ').'; });
  $('available').addEventListener('click', () => send({ type: 'available' }));
  $('away').addEventListener('click', () => send({ type: 'away' }));
  $('take').addEventListener('click', () => send({ type: 'take', topic: $('take_topic').value }));
  $('end').addEventListener('click', () => serving && send({ type: 'end', session_id: serving }));
  $('logout').addEventListener('click', async () => { await post('/admin/logout', {}); ws && ws.close(1000); });
  $('say').addEventListener('submit', (e) => { e.preventDefault(); if (!serving) return; const t = $('text').value; send({ type: 'say', session_id: serving, text: t }); log('you: ' + t); $('text').value = ''; });
  connect();
})();

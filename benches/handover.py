#!/usr/bin/env python3
# A restart on a shared port under load: the demo A serves; 8 client threads open a new
# connection per request; B joins the port (--share-port); A gets SIGTERM and drains. Prints
# how many requests were answered and how many failed (reset, or closed unanswered).
# Usage: python3 benches/handover.py reactor|tokio (after `cargo build --example server`).
import socket, subprocess, threading, time, sys, signal
import os
bin=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "debug", "examples", "server"); backend=sys.argv[1]
a=subprocess.Popen([bin,"--backend",backend,"--addr","127.0.0.1:0"],stdout=subprocess.PIPE,stderr=subprocess.DEVNULL,text=True)
addr=a.stdout.readline().split("://")[1].split()[0]; host,port=addr.rsplit(":",1); port=int(port)
stop=False; ok=[0]; bad=[]
def client():
    while not stop:
        try:
            s=socket.create_connection((host,port),timeout=10)
            s.sendall(b"GET /plaintext HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            d=b""
            while True:
                x=s.recv(4096)
                if not x: break
                d+=x
            s.close()
            if d.endswith(b"Hello, World!"): ok[0]+=1
            else: bad.append(d[:40])
        except Exception as e: bad.append(repr(e))
ts=[threading.Thread(target=client) for _ in range(8)]
[t.start() for t in ts]
time.sleep(0.5)
b=subprocess.Popen([bin,"--backend",backend,"--addr",addr,"--share-port"],stdout=subprocess.PIPE,stderr=subprocess.DEVNULL,text=True)
b.stdout.readline(); time.sleep(0.5)
a.send_signal(signal.SIGTERM); a.wait(); time.sleep(0.5)
stop=True; [t.join() for t in ts]; b.kill()
print(backend, "ok", ok[0], "bad", len(bad), bad[:3])

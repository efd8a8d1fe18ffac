"""HTML pages: the index, the demo room, and the operations dashboard."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import tornado.web

from server.auth import mint_token, verify_password
from server.node import Node

COOKIE = "squall_admin"


class PageHandler(tornado.web.RequestHandler):
    node: Node

    def initialize(self, node: Node) -> None:
        self.node = node

    def set_default_headers(self) -> None:
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "same-origin")


class IndexHandler(PageHandler):
    def get(self) -> None:
        self.render(
            "index.html",
            version=self.node.version,
            node_id=self.node.node_id,
            demo=self.node.settings.server.demo,
        )


class DemoHandler(PageHandler):
    def prepare(self) -> None:
        if not self.node.settings.server.demo:
            raise tornado.web.HTTPError(404, reason="the demo is off (server.demo)")

    def get(self) -> None:
        self.render("demo.html", version=self.node.version)


class DemoTokenHandler(DemoHandler):
    """Tokens for the demo room: any name, one hour. Only with server.demo."""

    def check_xsrf_cookie(self) -> None:
        return None

    def post(self) -> None:
        try:
            body = orjson.loads(self.request.body or b"{}")
            user = str(body.get("user", "")).strip()[:32]
        except (orjson.JSONDecodeError, AttributeError):
            user = ""
        if not user:
            self.set_status(400)
            self.finish({"error": {"code": 107, "message": "'user' is required"}})
            return
        token = mint_token(self.node.settings.auth, sub=user, ttl=3600, info={"name": user})
        self.finish({"token": token})


class DashboardBase(PageHandler):
    def prepare(self) -> None:
        if not self.node.settings.dashboard.password_hash:
            raise tornado.web.HTTPError(
                404, reason="the dashboard is off: set dashboard.password_hash"
            )

    def get_current_user(self) -> str | None:
        hours = self.node.settings.dashboard.session_hours
        value = self.get_signed_cookie(COOKIE, max_age_days=hours / 24)
        return value.decode() if value else None


class LoginHandler(DashboardBase):
    def get(self) -> None:
        self.render("login.html", error=None)

    async def post(self) -> None:
        password = self.get_body_argument("password", "")
        if not verify_password(password, self.node.settings.dashboard.password_hash):
            await asyncio.sleep(0.5)  # friction for guessing, without blocking anyone else
            self.set_status(401)
            self.render("login.html", error="Wrong password.")
            return
        self.set_signed_cookie(
            COOKIE,
            "admin",
            expires_days=self.node.settings.dashboard.session_hours / 24,
            httponly=True,
            samesite="Strict",
            secure=self.request.protocol == "https",
        )
        self.redirect("/dashboard")


class LogoutHandler(DashboardBase):
    def post(self) -> None:
        self.clear_cookie(COOKIE)
        self.redirect("/dashboard/login")


class DashboardHandler(DashboardBase):
    @tornado.web.authenticated
    def get(self) -> None:
        self.render("dashboard.html", version=self.node.version)


class DashboardDataHandler(DashboardBase):
    """What only an admin sees: the busiest channels, by local subscribers."""

    @tornado.web.authenticated
    def get(self) -> None:
        counts = self.node.hub.channel_counts()
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        body: dict[str, Any] = {"channels": [{"channel": c, "subscribers": n} for c, n in top]}
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(orjson.dumps(body))
